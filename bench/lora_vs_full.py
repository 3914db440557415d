"""LoRA DreamBooth against whole-UNet DreamBooth on the same model, data and batch, in this process: seconds per
step, trained parameters, optimizer state, checkpoint size, and on a GPU the peak memory of a step.

    python bench/lora_vs_full.py                                    # the micro world's model on the CPU
    python bench/lora_vs_full.py --arch sd15 --device cuda --batch 1  # SD 1.5's architecture, random weights
    python bench/lora_vs_full.py --arch sdxl --device cuda --batch 1  # SDXL 1.0 base's, 1024 px

Identity and CLIP-T of the two in the world come from the quality benchmark:
    python bench/quality.py --methods dreambooth dreambooth_lora --concepts 2
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from step_timing import TimingSink, step_timing_parser  # bench/, beside this script

from personalize.config import resolve_runs
from personalize.loop import learned_state, run_stage
from personalize.models import build_full_size_model, load_components
from personalize.run_context import prepare_run
from personalize.run_settings import ExperimentConfig
from personalize.synthetic import DEFAULT_CONCEPTS, write_concepts

WORLD_MODEL = Path(__file__).resolve().parent.parent / "models" / "microworld" / "model"
METHODS = ("dreambooth", "dreambooth_lora")


def measure(spec, model: Path, warmup: int) -> dict:
    ctx = prepare_run(spec, load_components(str(model)), progress=False)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    stage = spec.method.stages[0]
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sink = TimingSink(ctx.run_dir)
    run_stage(ctx, 0, stage, sink, None, 0, progress=False)
    gaps = [b - a for a, b in zip(sink.stamps[warmup:], sink.stamps[warmup + 1:])]
    learned = learned_state(ctx, 0)
    save_file({k: v.detach().cpu().contiguous() for k, v in learned.items()}, str(ctx.run_dir / "learned.safetensors"))
    params = sum(v.numel() for v in learned.values())
    return {"step_s": statistics.median(gaps), "params": params, "optimizer_mb": 2 * 4 * params / 2**20,
            "checkpoint_mb": (ctx.run_dir / "learned.safetensors").stat().st_size / 2**20,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def main() -> None:
    parser = step_timing_parser(__doc__, ["world", "sd15", "sd21", "sdxl"], batch=1, steps=30, rounds=2)
    args = parser.parse_args()
    resolution = args.resolution or {"world": 64, "sdxl": 1024}.get(args.arch, 512)
    rows = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = WORLD_MODEL if args.arch == "world" else build_full_size_model(tmp / "model", args.arch)
        manifest = write_concepts(tmp / "concepts", DEFAULT_CONCEPTS[:1], size=max(resolution, 128))
        for round_ in range(args.rounds):
            for method in METHODS:  # interleaved, so drifts of a shared machine hit both alike
                experiment = ExperimentConfig(
                    model=str(model), method=method, concepts=str(manifest), output_dir=str(tmp / f"out{round_}"),
                    resolution=resolution, device=args.device, latent_variants=2, prior_cache_dir=str(tmp / "priors"),
                    overrides={"stages.finetune.steps": args.steps, "stages.finetune.batch_size": args.batch,
                               "class_prior.num_images": 4, "class_prior.inference_steps": 2})
                rows[method].append(measure(resolve_runs(experiment)[0], model, args.warmup))
    best = {m: min(r, key=lambda x: x["step_s"]) for m, r in rows.items()}
    print(f"\n{args.arch} model, {resolution} px, batch {args.batch} + {args.batch} class prior: best of {args.rounds} "
          f"interleaved rounds, each the median of {args.steps - args.warmup - 1} steps")
    print(f"{'method':16} {'s/step':>8} {'trained params':>15} {'AdamW state MB':>15} {'checkpoint MB':>14} {'peak GB':>8}")
    for method, r in best.items():
        print(f"{method:16} {r['step_s']:8.4f} {r['params']:15,d} {r['optimizer_mb']:15.2f} {r['checkpoint_mb']:14.3f} "
              f"{r['peak_gb']:8.2f}")
    full, lora = best["dreambooth"], best["dreambooth_lora"]
    print(f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}, checkpoint {lora['checkpoint_mb'] / full['checkpoint_mb']:.4f}")


if __name__ == "__main__":
    main()
