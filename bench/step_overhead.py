"""Per-step time of the staged loop against a plain hand-written diffusers loop doing the same maths.

Both run in this process on the same model, data and batch: Textual Inversion (placeholder rows only,
text encoder in the graph) and DreamBooth (whole UNet, instance + class-prior batch). The plain loop is
the minimum: draw cached latents, noise, UNet, MSE, backward, AdamW. Prints the ratio ours / plain
(target <= 1.05), the model FLOPs of a step, the achieved TFLOP/s and, given the device's peak, the model-FLOP
utilisation; on a GPU the peak memory of our loop (`--gradient-checkpointing` to measure that option).

    python bench/step_overhead.py                   # tiny model on the CPU (--arch tiny-sdxl: the tiny SDXL)
    python bench/step_overhead.py --arch sd15 --device cuda --resolution 512 --batch 1
    python bench/step_overhead.py --arch sdxl --device cuda --batch 1   # SDXL 1.0 base's architecture at 1024 px
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from step_timing import TimingSink, step_timing_parser  # bench/, beside this script

from personalize.config import resolve_runs
from personalize.data import generator
from personalize.loop import run_stage
from personalize.models import TINY_ARCHS, build_full_size_model, build_tiny_model, load_components
from personalize.optim import make_optimizer
from personalize.run_context import prepare_run
from personalize.run_settings import ExperimentConfig
from personalize.synthetic import DEFAULT_CONCEPTS, write_concepts
from personalize.tokens import tokenize


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(ctx, stage, warmup: int) -> float:
    sink = TimingSink(ctx.run_dir)
    run_stage(ctx, 0, stage, sink, None, 0, progress=False)
    gaps = [b - a for a, b in zip(sink.stamps[warmup:], sink.stamps[warmup + 1 :])]
    return statistics.median(gaps)


def plain_condition(comps, prompts: list[str], device) -> tuple[torch.Tensor, dict]:
    """The UNet's text input written out: SD's last hidden state; SDXL's two penultimate layers side by side, the
    second encoder's pooled output and the time ids of an uncropped square image."""
    if comps.text_encoder_2 is None:
        return comps.text_encoder(tokenize(comps.tokenizer, prompts).to(device))[0], {}
    first = comps.text_encoder(tokenize(comps.tokenizer, prompts).to(device), output_hidden_states=True)
    second = comps.text_encoder_2(tokenize(comps.tokenizer_2, prompts).to(device), output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1), {"text_embeds": second[0]}


def with_time_ids(extra: dict, latents: torch.Tensor, vae_scale: int) -> dict:
    if not extra:
        return {}
    side = latents.shape[-1] * vae_scale
    ids = torch.tensor([side, side, 0, 0, side, side], device=latents.device, dtype=extra["text_embeds"].dtype)
    return {"added_cond_kwargs": {**extra, "time_ids": ids.expand(latents.shape[0], 6)}}


def plain(ctx, stage, warmup: int) -> float:
    """The same step written out by hand, no framework: the baseline the ratio is taken against."""
    comps, device = ctx.components, ctx.device
    if stage.trainable == ["placeholder"]:
        params = [m.get_input_embeddings().rows for m in (comps.text_encoder, comps.text_encoder_2) if m is not None]
    else:
        params = list(comps.unet.parameters())
    for model in ctx.models.values():
        model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = make_optimizer(params, stage)
    bank, priors = ctx.instances, ctx.batcher.priors
    prompt = ctx.placeholders.fill("a photo of a {placeholder} {super_category}")
    prompts = [prompt] * stage.batch_size
    with torch.no_grad():
        frozen_text = plain_condition(comps, prompts, device) if stage.trainable != ["placeholder"] else None
        prior_text = plain_condition(comps, [priors.captions[0]] * stage.batch_size, device) if stage.use_class_prior else None
    autocast = torch.autocast(device.type, dtype=ctx.autocast_dtype) if ctx.autocast_dtype else contextlib.nullcontext()
    times = []
    for step in range(stage.steps):
        sync(device)
        began = time.perf_counter()
        gen = generator("plain", step)
        latents = bank.sample(torch.randint(len(bank), (stage.batch_size,), generator=gen), gen)
        text = frozen_text
        if stage.use_class_prior:
            latents = torch.cat([latents, priors.sample(torch.randint(len(priors), (stage.batch_size,), generator=gen), gen)])
        latents = latents.to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=gen).to(device)
        noisy = comps.noise_scheduler.add_noise(latents, noise, t)
        with autocast:
            text, extra = text if text is not None else plain_condition(comps, prompts, device)
            if prior_text is not None:
                text = torch.cat([text, prior_text[0]])
                extra = {k: torch.cat([v, prior_text[1][k]]) for k, v in extra.items()}
            pred = comps.unet(noisy, t, text, **with_time_ids(extra, noisy, comps.vae_scale)).sample
            if stage.use_class_prior:
                a, b = pred.float().chunk(2)
                n1, n2 = noise.float().chunk(2)
                loss = F.mse_loss(a, n1) + F.mse_loss(b, n2)
            else:
                loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the staged loop reads every loss value for logging; so does a script that prints it
        sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times[warmup:])


def flops_per_step(ctx, stage) -> float:
    """The model FLOPs of one training step (forward and backward of every module in the step), as torch's
    FlopCounterMode counts them on the plain loop: matrix multiplies, convolutions and attention."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        plain(ctx, stage.model_copy(update={"steps": 1}), 0)
    return float(counter.get_total_flops())


def main() -> None:
    parser = step_timing_parser(__doc__, ["tiny", "tiny-sdxl", "sd15", "sd21", "sdxl"], batch=4, steps=40, rounds=3)
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak at the run's precision (H100/H200 SXM bf16: 989), for MFU")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="time our loop with it (the plain one without)")
    args = parser.parse_args()
    resolution = args.resolution or {"tiny": 64, "tiny-sdxl": 64, "sdxl": 1024}.get(args.arch, 512)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.arch.startswith("tiny"):
            model = build_tiny_model(tmp / "model", arch=TINY_ARCHS["sdxl" if args.arch == "tiny-sdxl" else "sd15"])
        else:
            model = build_full_size_model(tmp / "model", args.arch)
        manifest = write_concepts(tmp / "concepts", DEFAULT_CONCEPTS[:1], size=max(resolution, 128))
        rows = []
        for method, stage_name in (("textual_inversion", "embedding"), ("dreambooth", "finetune")):
            experiment = ExperimentConfig(
                model=str(model), method=method, concepts=str(manifest), output_dir=str(tmp / "out"), resolution=resolution,
                device=args.device, mixed_precision=args.precision, latent_variants=2, prior_cache_dir=str(tmp / "priors"),
                gradient_checkpointing=args.gradient_checkpointing,
                overrides={f"stages.{stage_name}.steps": args.steps, f"stages.{stage_name}.batch_size": args.batch,
                           "class_prior.num_images": 4, "class_prior.inference_steps": 2},
            )
            spec = resolve_runs(experiment)[0]
            stage = spec.method.stages[0]
            timings, peak = {"plain": [], "ours": []}, 0.0
            for _ in range(args.rounds):  # interleaved, so drifts of a shared machine hit both alike
                for label, fn in (("plain", plain), ("ours", ours)):
                    ctx = prepare_run(spec, load_components(str(model)), progress=False)
                    ctx.run_dir.mkdir(parents=True, exist_ok=True)
                    if ctx.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    timings[label].append(fn(ctx, stage, args.warmup))
                    if ctx.device.type == "cuda" and label == "ours":
                        peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
            flops = flops_per_step(prepare_run(spec, load_components(str(model)), progress=False), stage)
            base, mine = min(timings["plain"]), min(timings["ours"])
            rows.append((method, stage_name, base, mine, mine / base, flops, peak))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    print(f"\nstep time, {args.arch} model, {resolution} px, batch {args.batch}, device {device}: best of {args.rounds} "
          f"interleaved rounds, each the median of {args.steps - args.warmup} steps")
    print(f"{'method':20} {'stage':10} {'plain (ms)':>11} {'ours (ms)':>10} {'ratio':>7} {'TFLOP/step':>11} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}")
    for method, stage_name, base, mine, ratio, flops, peak in rows:
        achieved = flops / mine / 1e12
        mfu = f"{achieved / args.peak_tflops:6.1%}" if args.peak_tflops else f"{'-':>6}"
        print(f"{method:20} {stage_name:10} {base * 1e3:11.2f} {mine * 1e3:10.2f} {ratio:7.3f} {flops / 1e12:11.4f} "
              f"{achieved:8.3f} {mfu} {peak if peak else float('nan'):8.2f}")
    print("TFLOP/step: torch's FlopCounterMode over one plain step (forward and backward: matmuls, convolutions, "
          "attention; the VAE is not in a step, its latents are cached); MFU = TFLOP/s of our step / --peak-tflops")


if __name__ == "__main__":
    main()
