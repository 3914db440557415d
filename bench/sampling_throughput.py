"""Images per second of our sampling (a finished run's personalised pipeline, deterministic per-image seeds)
against a plain `StableDiffusionPipeline(...)` (SDXL: `StableDiffusionXLPipeline`) call on the same model, batch, steps and scheduler, interleaved
in one process. Prints the ratio ours / plain (target >= 0.95).

    python bench/sampling_throughput.py                           # tiny model on the CPU
    python bench/sampling_throughput.py --arch sd15 --device cuda --resolution 512 --batch 8 --steps 25
    python bench/sampling_throughput.py --arch sdxl --device cuda --batch 4 --steps 25   # 1024 px
    python bench/sampling_throughput.py --arch tiny-sdxl                                 # the tiny SDXL on the CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from personalize.config import resolve_runs
from personalize.loop import run_method
from personalize.models import TINY_ARCHS, build_full_size_model, build_tiny_model
from personalize.run_settings import ExperimentConfig
from personalize.sampling import LoadedRun, generate
from personalize.synthetic import DEFAULT_CONCEPTS, write_concepts


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "tiny-sdxl", "sd15", "sd21", "sdxl"], default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16 on a GPU, fp32 on the CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    resolution = args.resolution or {"tiny": 64, "tiny-sdxl": 64, "sdxl": 1024}.get(args.arch, 512)
    sdxl = args.arch.endswith("sdxl")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.arch.startswith("tiny"):
            model = build_tiny_model(tmp / "model", arch=TINY_ARCHS["sdxl" if sdxl else "sd15"])
        else:
            model = build_full_size_model(tmp / "model", args.arch)
        manifest = write_concepts(tmp / "concepts", DEFAULT_CONCEPTS[:1], size=max(128, resolution))
        spec = resolve_runs(ExperimentConfig(model=str(model), method="textual_inversion", concepts=str(manifest),
                                             output_dir=str(tmp / "out"), resolution=resolution, device=str(device),
                                             latent_variants=1, overrides={"stages.embedding.steps": 2},
                                             samples={"steps": 1, "seeds": [0], "heatmaps": False}))[0]
        run_method(spec, progress=False)
        ours_run = LoadedRun(spec.run_dir, device=str(device))
        for module in (ours_run.components.vae, *ours_run.components.models.values()):
            module.to(dtype)
        ours_pipe = ours_run.pipeline("ddim")
        if sdxl:
            plain = StableDiffusionXLPipeline.from_pretrained(str(model), torch_dtype=dtype).to(device)
        else:
            plain = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, safety_checker=None,
                                                            requires_safety_checker=False).to(device)
        plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
        plain.set_progress_bar_config(disable=True)
        prompts = [ours_run.fill("a photo of a {}")] * args.batch
        seeds = list(range(args.batch))

        def ours() -> None:
            generate(ours_pipe, prompts, seeds, resolution, args.steps, 7.5, batch_size=args.batch)

        def baseline() -> None:
            plain(["a photo of a toy"] * args.batch, height=resolution, width=resolution, num_inference_steps=args.steps,
                  guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0), output_type="pil")

        ours(), baseline()  # warm-up
        times = {"plain": [], "ours": []}
        for _ in range(args.rounds):
            times["plain"].append(timed(baseline, device))
            times["ours"].append(timed(ours, device))
    plain_ips, ours_ips = args.batch / min(times["plain"]), args.batch / min(times["ours"])
    print(f"\nsampling, {args.arch} model, {resolution} px, batch {args.batch}, {args.steps} DDIM steps, {dtype}, "
          f"device {device}, best of {args.rounds} interleaved rounds")
    print(f"plain {type(plain).__name__}: {plain_ips:8.2f} images/s")
    print(f"ours (personalised run):       {ours_ips:8.2f} images/s")
    print(f"ratio ours / plain:            {ours_ips / plain_ips:8.3f}")


if __name__ == "__main__":
    main()
