"""Train the micro world's models from scratch: VAE, text encoder + UNet (a tiny Stable Diffusion), a world
CLIP and a self-supervised identity encoder; write them with model cards.

    python -m microworld.train --out models/microworld                 # every part, ~2 h on 2 CPU cores
    python -m microworld.train --out /tmp/mw --scale 0.05              # a quick smoke run of every part
    python -m microworld.train --device cuda --images 100000 --base-batch 256 --clip-batch 512 \
        --vae-minutes 1 --base-minutes 4.3 --clip-minutes 7 --identity-minutes 0.4   # ~16 min on one H100

Every part trains for a wall-clock budget; learning rates follow a cosine over the fraction of it used.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

from microworld.budget import Log, RunningMean, budget_loop, cosine_lr, update
from microworld.data import render_set, to_tensor
from microworld.models import (
    CLIP_CONFIG,
    CLIP_PREPROCESS,
    WorldArch,
    world_clip,
    world_identity_encoder,
    world_scheduler,
    world_text_encoder,
    world_unet,
    world_vae,
)
from personalize.models import clip_tokenizer
from personalize.tokens import tokenize


@dataclass
class Plan:
    """Wall-clock minutes per part, batch sizes and the size of the rendered training set (budgets and data
    size scale together with --scale)."""

    images: int = 60_000
    vae_minutes: float = 13.0
    base_minutes: float = 80.0
    clip_minutes: float = 12.0
    identity_minutes: float = 8.0
    vae_batch: int = 32
    base_batch: int = 32
    base_lr: float = 5e-4
    clip_batch: int = 256
    clip_lr: float = 1e-3

    def scaled(self, k: float) -> Plan:
        return replace(self, images=max(512, int(self.images * k)), vae_minutes=self.vae_minutes * k,
                       base_minutes=self.base_minutes * k, clip_minutes=self.clip_minutes * k,
                       identity_minutes=self.identity_minutes * k)


# ---------------------------------------------------------------------------------------------- VAE


def train_vae(pixels: torch.Tensor, minutes: float, device: torch.device, log: Log, arch: WorldArch, batch: int = 32) -> tuple:
    torch.manual_seed(1)
    vae = world_vae(arch).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    loss_value = RunningMean(0.98)
    for step, used in budget_loop(minutes, 20):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, used, 50, 1e-3)
        x = pixels[torch.randint(len(pixels), (batch,), device=pixels.device)].to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = (recon - x).abs().mean() + F.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        update(opt, loss, loss_value)
        if step % 100 == 0:
            log.say("vae", f"step {step} loss {float(loss_value):.4f}")
    vae.eval()
    with torch.no_grad():
        x = pixels[:256].to(device)
        dist = vae.encode(x).latent_dist
        mse = float(F.mse_loss(vae.decode(dist.mean).sample, x))
        scaling = float(1.0 / dist.mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log.records["vae"] = {"steps": step + 1, "batch": batch, "final_loss": round(float(loss_value), 5), "recon_mse": round(mse, 5),
                          "scaling_factor": round(scaling, 5), "minutes": minutes}
    log.say("vae", f"done: {step + 1} steps, reconstruction MSE {mse:.4f}, latent scaling {scaling:.4f}")
    return vae, scaling


def reuse_vae(folder: Path, log: Log) -> tuple:
    """The VAE of an earlier run's pipeline folder, with that run's record of it (when its training.json is there)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    earlier = folder.parent / "training.json"
    if earlier.exists():
        records = json.loads(earlier.read_text())
        log.records["vae"] = records.get("vae", {})
        command = log.records["vae"].get("command")
        if command in records.get("runs", {}):
            log.records.setdefault("runs", {})[command] = records["runs"][command]
    log.records.setdefault("vae", {})["reused_from"] = str(folder)
    log.say("vae", f"reusing the VAE of {folder}")
    return vae, float(vae.config.scaling_factor)


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), 256):
        dist = vae.encode(pixels[i : i + 256].to(device)).latent_dist
        means.append(dist.mean.half().cpu())
        stds.append(dist.std.half().cpu())
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------- text-to-image


def earlier_base(folder: Path) -> tuple:
    """The text encoder and UNet of an earlier run's pipeline folder, in fp32, to continue training from."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32),
            UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32))


def train_base(mean, std, captions, scaling: float, minutes: float, device: torch.device, log: Log, arch: WorldArch,
               batch: int = 32, lr: float = 5e-4, start_from: Path | None = None):
    """Text encoder + UNet, jointly, with the objective the scheduler names (v-prediction for the world model);
    from scratch, or continuing an earlier run's pair (`start_from`, a pipeline folder)."""
    torch.manual_seed(2)
    tokenizer = clip_tokenizer()
    if start_from:
        text_encoder, unet = earlier_base(start_from)
        text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
        log.say("base", f"continuing from {start_from}")
    else:
        text_encoder, unet = world_text_encoder(arch).to(device), world_unet(arch).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    scheduler = DDPMScheduler.from_config(world_scheduler().config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    mean, std = mean.to(device), std.to(device)
    ids, empty = tokenize(tokenizer, captions).to(device), tokenize(tokenizer, [""]).to(device)
    loss_value, rng = RunningMean(0.99), torch.Generator(device).manual_seed(3)
    for step, used in budget_loop(minutes, 20):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, used, 200, lr)
        idx = torch.randint(len(mean), (batch,), generator=rng, device=device)
        latents = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=rng, device=device)) * scaling
        tokens = ids[idx].clone()
        drop = torch.rand(batch, generator=rng, device=device) < 0.1  # unconditional samples for classifier-free guidance
        tokens[drop] = empty
        noise = torch.randn(latents.shape, generator=rng, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=rng, device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        pred = unet(noisy, t, text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for target_model, source in ((ema, unet), (ema_text, text_encoder)):
                torch._foreach_lerp_(list(target_model.parameters()), list(source.parameters()), 1 - decay)
        loss_value.add(loss)
        if step % 100 == 0:
            log.say("base", f"step {step} loss {float(loss_value):.4f} lr {opt.param_groups[0]['lr']:.2e}")
    log.records["base"] = {"steps": step + 1, "batch": batch, "final_loss_ema": round(float(loss_value), 5), "minutes": minutes,
                           "unet_params": sum(p.numel() for p in unet.parameters()),
                           "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
                           "ema_decay": 0.999, "caption_dropout": 0.1, "lr": lr,
                           "prediction_type": scheduler.config.prediction_type,
                           **({"continued_from": str(start_from)} if start_from else {})}
    log.say("base", f"done: {step + 1} steps, loss {float(loss_value):.4f}")
    return tokenizer, ema_text.eval(), ema.eval()


def save_pipeline(vae, text_encoder, unet, tokenizer, folder: Path) -> Path:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=world_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)
    # weights are stored in fp16 (half the size); the text encoder's config says fp32 so that a plain
    # StableDiffusionPipeline.from_pretrained loads every part in one dtype (transformers follows the config)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------- world CLIP


def train_clip(pixels: torch.Tensor, captions: list[str], short_captions: list[str], minutes: float, device: torch.device,
               log: Log, batch: int = 256, lr: float = 1e-3, start_from: Path | None = None):
    """Contrastive training; each picture is paired with its full caption or, half the time, its training caption
    (colour, pattern or scene sometimes left out) so that short prompts embed well too. Pictures whose captions
    are identical are positives of each other. `start_from`: an earlier run's clip folder to continue from."""
    torch.manual_seed(4)
    model = world_clip()
    if start_from:
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(start_from / "open_clip_model.safetensors").items()})
        log.say("clip", f"continuing from {start_from}")
    model = model.to(device)
    tokenizer = clip_tokenizer()
    full, short = tokenize(tokenizer, captions).to(device), tokenize(tokenizer, short_captions).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    loss_value, rng = RunningMean(0.98), torch.Generator(device).manual_seed(5)
    for step, used in budget_loop(minutes, 10):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, used, 100, lr)
        idx = torch.randint(len(pixels), (batch,), generator=rng, device=device)
        ids = torch.where((torch.rand(batch, generator=rng, device=device) < 0.5)[:, None], short[idx], full[idx])
        image = F.normalize(model.encode_image(pixels[idx].to(device)), dim=-1)
        text = F.normalize(model.encode_text(ids), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        same = (ids[:, None] == ids[None]).all(-1).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value.add(loss)
        if step % 50 == 0:
            log.say("clip", f"step {step} loss {float(loss_value):.4f}")
    log.records["clip"] = {"steps": step + 1, "batch": batch, "final_loss": round(float(loss_value), 5), "minutes": minutes,
                           "captions": "full or training caption, half each", "lr": lr,
                           **({"continued_from": str(start_from)} if start_from else {})}
    log.say("clip", f"done: {step + 1} steps, loss {float(loss_value):.4f}")
    return model.eval()


# ---------------------------------------------------------------------------------------------- identity encoder


def _identity_chunk(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    from microworld.world import COLOURS, MARKS, PATTERNS, SCENES, SHAPES, Scene, Thing, render

    count, seed = args
    rng = random.Random(seed)
    a, b = [], []
    colours = list(COLOURS)
    for _ in range(count):
        base = dict(shape=rng.choice(SHAPES), colour=rng.choice(colours), pattern=rng.choice(PATTERNS),
                    pattern_colour=rng.choice([None] + colours), mark=rng.choice(MARKS))
        for out in (a, b):
            thing = Thing(**base, size=rng.uniform(0.42, 0.7), x=rng.uniform(0.35, 0.65), y=rng.uniform(0.45, 0.62),
                          angle=rng.uniform(-30, 30))
            out.append(np.asarray(render(Scene(thing, rng.choice(list(SCENES)), "photo", rng.randrange(1 << 30)))))
    return np.stack(a), np.stack(b)


def _identity_views(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of photos of the same object (any colour pair, pattern, mark) in different poses and scenes."""
    from concurrent.futures import ProcessPoolExecutor

    from microworld.data import default_workers

    workers = default_workers()
    size = max(1, -(-count // (workers * 4)))
    jobs = [(min(size, count - s), seed * 1_000_003 + s) for s in range(0, count, size)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_identity_chunk, jobs))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_identity(minutes: float, pairs: int, device: torch.device, log: Log, batch: int = 128):
    from personalize.metrics import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(6)
    a, b = _identity_views(pairs, seed=7)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def prep(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    model = world_identity_encoder().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loss_value, rng = RunningMean(0.98), torch.Generator().manual_seed(8)
    for step, used in budget_loop(minutes, 10):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, used, 50, 1e-3)
        idx = torch.randint(len(a), (batch,), generator=rng).numpy()
        za = F.normalize(model(pixel_values=prep(a[idx]).to(device)).last_hidden_state[:, 0], dim=-1)
        zb = F.normalize(model(pixel_values=prep(b[idx]).to(device)).last_hidden_state[:, 0], dim=-1)
        logits = za @ zb.T / 0.1
        labels = torch.arange(batch, device=device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        update(opt, loss, loss_value)
        if step % 50 == 0:
            log.say("identity", f"step {step} loss {float(loss_value):.4f}")
    log.records["identity"] = {"steps": step + 1, "batch": batch, "pairs": pairs, "final_loss": round(float(loss_value), 5),
                               "minutes": minutes, "temperature": 0.1}
    log.say("identity", f"done: {step + 1} steps, loss {float(loss_value):.4f}")
    return model.eval()


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/microworld")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every time budget and the data size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vae-from", help="reuse the VAE of an earlier run's pipeline folder instead of training one")
    parser.add_argument("--base-from", help="continue the text encoder and UNet of an earlier run's pipeline folder")
    parser.add_argument("--clip-from", help="continue the world CLIP of an earlier run's clip folder")
    parser.add_argument("--parts", nargs="+", default=["base", "clip", "identity"], choices=["base", "clip", "identity"])
    for f in fields(Plan):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), help=f"override the plan's {f.name}")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    plan, arch, log, out = Plan().scaled(args.scale), WorldArch(), Log(), Path(args.out)
    plan = replace(plan, **{f.name: getattr(args, f.name) for f in fields(Plan) if getattr(args, f.name) is not None})
    command = " ".join(["python -m microworld.train", *sys.argv[1:]])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "training.json"
    if earlier.exists() and set(args.parts) != {"base", "clip", "identity"}:  # parts not retrained keep their record
        log.records = json.loads(earlier.read_text())

    def record(*parts: str) -> None:  # after every part, so that an interrupted run still says what it made
        minutes = round((time.perf_counter() - began) / 60, 1)
        for part in parts:
            log.records[part].update(command=command, device=where)
        log.records.setdefault("runs", {})[command] = {"device": where, "wall_minutes": minutes}
        earlier.write_text(json.dumps(log.records, indent=1))

    log.say("data", f"rendering {plan.images} pictures")
    images, captions, full_captions = render_set(plan.images, seed=0)
    pixels = to_tensor(images).to(device)
    data = {"images": plan.images, "seed": 0}
    if "base" in args.parts:
        if args.vae_from:
            vae, scaling = reuse_vae(Path(args.vae_from), log)
        else:
            vae, scaling = train_vae(pixels, plan.vae_minutes, device, log, arch, plan.vae_batch)
        vae = vae.to(device)
        mean, std = encode_all(vae, pixels, device)
        tokenizer, text_encoder, unet = train_base(mean, std, captions, scaling, plan.base_minutes, device, log, arch,
                                                   plan.base_batch, plan.base_lr,
                                                   Path(args.base_from) if args.base_from else None)
        save_pipeline(vae.float().cpu(), text_encoder.cpu(), unet.cpu(), tokenizer, out / "model")
        log.records["base"]["data"] = data
        record("base", *([] if args.vae_from else ["vae"]))
    if "clip" in args.parts:
        from personalize.metrics import save_open_clip

        clip = train_clip(pixels, full_captions, captions, plan.clip_minutes, device, log, plan.clip_batch, plan.clip_lr,
                          Path(args.clip_from) if args.clip_from else None)
        save_open_clip(clip.cpu().half(), CLIP_CONFIG, out / "clip", CLIP_PREPROCESS)
        log.records["clip"]["data"] = data
        record("clip")
    if "identity" in args.parts:
        train_identity(plan.identity_minutes, max(2000, plan.images // 3), device, log).cpu().save_pretrained(out / "identity")
        record("identity")
    log.say("all", f"finished in {(time.perf_counter() - began) / 60:.1f} min; now run: python -m microworld.card --models {out}")


if __name__ == "__main__":
    main()
