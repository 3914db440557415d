"""Train the micro world's models from scratch: VAE, text encoder + UNet (a tiny Stable Diffusion), a world
CLIP and a self-supervised identity encoder; write them with model cards.

    python -m microworld.train --out models/microworld                 # the committed models, ~2 h on 2 CPU cores
    python -m microworld.train --out /tmp/mw --scale 0.05              # a quick smoke run of every part
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

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
    """Wall-clock minutes per part and the size of the rendered training set (scaled together by --scale)."""

    images: int = 60_000
    vae_minutes: float = 13.0
    base_minutes: float = 80.0
    clip_minutes: float = 12.0
    identity_minutes: float = 8.0

    def scaled(self, k: float) -> Plan:
        return Plan(max(512, int(self.images * k)), self.vae_minutes * k, self.base_minutes * k, self.clip_minutes * k,
                    self.identity_minutes * k)


@dataclass
class Log:
    """Progress lines to stdout and a record of every part for the model cards."""

    records: dict = field(default_factory=dict)

    def say(self, part: str, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {part}: {text}", flush=True)


def budget_loop(minutes: float, min_steps: int = 1):
    """Step numbers until the time budget is spent (at least `min_steps`)."""
    began, step = time.perf_counter(), 0
    while step < min_steps or time.perf_counter() - began < minutes * 60:
        yield step
        step += 1


def cosine_lr(step: int, warmup: int, peak: float, horizon: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------- VAE


def train_vae(pixels: torch.Tensor, minutes: float, device: torch.device, log: Log, arch: WorldArch) -> tuple:
    torch.manual_seed(1)
    vae = world_vae(arch).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    horizon = max(200, int(minutes * 60 / 0.7))
    loss_value = float("nan")
    for step in budget_loop(minutes, 20):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, 50, 1e-3, horizon)
        x = pixels[torch.randint(len(pixels), (32,))].to(device)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = (recon - x).abs().mean() + F.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = 0.98 * loss_value + 0.02 * float(loss) if step else float(loss)
        if step % 100 == 0:
            log.say("vae", f"step {step} loss {loss_value:.4f}")
    vae.eval()
    with torch.no_grad():
        x = pixels[:256].to(device)
        dist = vae.encode(x).latent_dist
        mse = float(F.mse_loss(vae.decode(dist.mean).sample, x))
        scaling = float(1.0 / dist.mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log.records["vae"] = {"steps": step + 1, "batch": 32, "final_loss": round(loss_value, 5), "recon_mse": round(mse, 5),
                          "scaling_factor": round(scaling, 5), "minutes": minutes}
    log.say("vae", f"done: {step + 1} steps, reconstruction MSE {mse:.4f}, latent scaling {scaling:.4f}")
    return vae, scaling


def reuse_vae(folder: Path, log: Log) -> tuple:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    earlier = folder.parent / "training.json"
    if earlier.exists():
        log.records["vae"] = json.loads(earlier.read_text()).get("vae", {})
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


def train_base(mean, std, captions, scaling: float, minutes: float, device: torch.device, log: Log, arch: WorldArch,
               batch: int = 32):
    torch.manual_seed(2)
    tokenizer = clip_tokenizer()
    text_encoder, unet = world_text_encoder(arch).to(device), world_unet(arch).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    scheduler = DDPMScheduler.from_config(world_scheduler().config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])
    horizon = max(500, int(minutes * 60 / 0.8))
    loss_value, rng = float("nan"), torch.Generator().manual_seed(3)
    for step in budget_loop(minutes, 20):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, 200, 5e-4, horizon)
        idx = torch.randint(len(mean), (batch,), generator=rng)
        latents = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=rng)) * scaling
        tokens = ids[idx].clone()
        drop = torch.rand(batch, generator=rng) < 0.1  # unconditional samples for classifier-free guidance
        tokens[drop] = empty
        noise = torch.randn(latents.shape, generator=rng)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=rng)
        noisy = scheduler.add_noise(latents, noise, t)
        pred = unet(noisy.to(device), t.to(device), text_encoder(tokens.to(device))[0]).sample
        loss = F.mse_loss(pred, noise.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for target, source in ((ema, unet), (ema_text, text_encoder)):
                for e, p in zip(target.parameters(), source.parameters()):
                    e.lerp_(p, 1 - decay)
        loss_value = 0.99 * loss_value + 0.01 * float(loss) if step else float(loss)
        if step % 100 == 0:
            log.say("base", f"step {step} loss {loss_value:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    log.records["base"] = {"steps": step + 1, "batch": batch, "final_loss_ema": round(loss_value, 5), "minutes": minutes,
                           "unet_params": sum(p.numel() for p in unet.parameters()),
                           "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
                           "ema_decay": 0.999, "caption_dropout": 0.1, "lr": 5e-4}
    log.say("base", f"done: {step + 1} steps, loss {loss_value:.4f}")
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


def train_clip(pixels: torch.Tensor, captions: list[str], minutes: float, device: torch.device, log: Log, batch: int = 256):
    torch.manual_seed(4)
    model = world_clip().to(device)
    tokenizer = clip_tokenizer()
    ids = tokenize(tokenizer, captions)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    horizon = max(200, int(minutes * 60 / 1.0))
    loss_value, rng = float("nan"), torch.Generator().manual_seed(5)
    for step in budget_loop(minutes, 10):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, 100, 1e-3, horizon)
        idx = torch.randint(len(pixels), (batch,), generator=rng)
        image = F.normalize(model.encode_image(pixels[idx].to(device)), dim=-1)
        text = F.normalize(model.encode_text(ids[idx].to(device)), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        same = (ids[idx][:, None] == ids[idx][None]).all(-1).float().to(device)  # identical captions are positives
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value = 0.98 * loss_value + 0.02 * float(loss) if step else float(loss)
        if step % 50 == 0:
            log.say("clip", f"step {step} loss {loss_value:.4f}")
    log.records["clip"] = {"steps": step + 1, "batch": batch, "final_loss": round(loss_value, 5), "minutes": minutes}
    log.say("clip", f"done: {step + 1} steps, loss {loss_value:.4f}")
    return model.eval()


# ---------------------------------------------------------------------------------------------- identity encoder


def _identity_views(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of photos of the same object (any colour pair, pattern, mark) in different poses and scenes."""
    from microworld.world import COLOURS, MARKS, PATTERNS, SCENES, SHAPES, Scene, Thing, render

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


def train_identity(minutes: float, pairs: int, device: torch.device, log: Log, batch: int = 128):
    from personalize.metrics import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(6)
    a, b = _identity_views(pairs, seed=7)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def prep(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    model = world_identity_encoder().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    horizon = max(200, int(minutes * 60 / 0.6))
    loss_value, rng = float("nan"), torch.Generator().manual_seed(8)
    for step in budget_loop(minutes, 10):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, 50, 1e-3, horizon)
        idx = torch.randint(len(a), (batch,), generator=rng).numpy()
        za = F.normalize(model(pixel_values=prep(a[idx]).to(device)).last_hidden_state[:, 0], dim=-1)
        zb = F.normalize(model(pixel_values=prep(b[idx]).to(device)).last_hidden_state[:, 0], dim=-1)
        logits = za @ zb.T / 0.1
        labels = torch.arange(batch, device=device)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = 0.98 * loss_value + 0.02 * float(loss) if step else float(loss)
        if step % 50 == 0:
            log.say("identity", f"step {step} loss {loss_value:.4f}")
    log.records["identity"] = {"steps": step + 1, "batch": batch, "pairs": pairs, "final_loss": round(loss_value, 5),
                               "minutes": minutes, "temperature": 0.1}
    log.say("identity", f"done: {step + 1} steps, loss {loss_value:.4f}")
    return model.eval()


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/microworld")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every time budget and the data size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vae-from", help="reuse the VAE of an earlier run's pipeline folder instead of training one")
    parser.add_argument("--base-minutes", type=float, help="override the text-to-image training budget")
    parser.add_argument("--parts", nargs="+", default=["base", "clip", "identity"], choices=["base", "clip", "identity"])
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    plan, arch, log, out = Plan().scaled(args.scale), WorldArch(), Log(), Path(args.out)
    began = time.perf_counter()
    log.say("data", f"rendering {plan.images} pictures")
    images, captions, full_captions = render_set(plan.images, seed=0)
    pixels = to_tensor(images)
    log.records["data"] = {"images": plan.images, "seed": 0}
    if args.base_minutes:
        plan.base_minutes = args.base_minutes
    if "base" in args.parts:
        vae, scaling = reuse_vae(Path(args.vae_from), log) if args.vae_from else train_vae(pixels, plan.vae_minutes, device, log, arch)
        vae = vae.to(device)
        mean, std = encode_all(vae, pixels, device)
        tokenizer, text_encoder, unet = train_base(mean, std, captions, scaling, plan.base_minutes, device, log, arch)
        save_pipeline(vae.float().cpu(), text_encoder.cpu(), unet.cpu(), tokenizer, out / "model")
    if "clip" in args.parts:
        from personalize.metrics import save_open_clip

        save_open_clip(train_clip(pixels, full_captions, plan.clip_minutes, device, log).cpu().half(), CLIP_CONFIG,
                       out / "clip", CLIP_PREPROCESS)
    if "identity" in args.parts:
        train_identity(plan.identity_minutes, max(2000, plan.images // 3), device, log).cpu().save_pretrained(out / "identity")
    log.records["wall_minutes"] = round((time.perf_counter() - began) / 60, 1)
    log.records["command"] = " ".join(["python -m microworld.train", *sys.argv[1:]])
    log.records["device"] = str(device) + ("" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(log.records, indent=1))
    log.say("all", f"finished in {log.records['wall_minutes']} min; now run: python -m microworld.card --models {out}")


if __name__ == "__main__":
    main()
