"""Validation and the best checkpoint on a micro-world DreamBooth run: the validation curve, the point chosen, and
the full evaluation of the chosen export against the last weights (same training: randomness is per step).

    python bench/validation.py                      # zebra-star, 800 steps, a point every 100: ~10 min on 2 cores
    python bench/validation.py --steps 400 --every 50 --concept berry-heart

Writes docs/validation.md (the table, the overhead) and docs/validation-curve.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from microworld.concepts import CONCEPTS, write_concepts  # noqa: E402
from personalize.config import resolve_runs  # noqa: E402
from personalize.evaluation import evaluate_run  # noqa: E402
from personalize.loop import run_method  # noqa: E402
from personalize.run_settings import EvaluationSpec, ExperimentConfig  # noqa: E402
from personalize.validation import read_points  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models" / "microworld"


def experiment(out: Path, concept, steps: int, every: int, selection: str) -> ExperimentConfig:
    manifest = write_concepts(out / "concepts", [concept])
    return ExperimentConfig(
        model=str(MODELS / "model"), method="dreambooth", concepts=str(manifest), output_dir=str(out / selection),
        resolution=64, latent_variants=8, seed=0, prior_cache_dir=str(out / "priors"),
        overrides={"stages.finetune.steps": steps, "class_prior.num_images": 8, "class_prior.inference_steps": 10,
                   "class_prior.guidance_scale": 5.0},
        samples={"prompts": ["a photo of a {subject} on the beach"], "seeds": [0], "steps": 10, "heatmaps": False,
                 "every_stage": False},
        validation={"every": every, "prompt_count": 4, "samples": 1, "prompts": "world_eval", "scheduler": "ddim",
                    "steps": 10, "guidance_scale": 5.0, "eta": 0.0, "clip": str(MODELS / "clip"),
                    "dino": str(MODELS / "identity"), "selection": selection, "objective": {"clip_i": 1.0, "dino": 1.0}},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="zebra-star", choices=[c.id for c in CONCEPTS])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--work", default="outputs/validation")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args()
    concept = next(c for c in CONCEPTS if c.id == args.concept)
    work, docs = Path(args.work).resolve(), Path(args.docs)
    evaluation = EvaluationSpec(prompts="world_eval", samples=2, scheduler="ddim", steps=20, guidance_scale=5.0, eta=0.0,
                                clip=str(MODELS / "clip"), dino=str(MODELS / "identity"))
    rows = {}
    for selection in ("last", "best"):
        spec = resolve_runs(experiment(work, concept, args.steps, args.every, selection))[0]
        run_method(spec, progress=True)  # a finished run is found, not retrained
        done = json.loads((spec.run_dir / "DONE.json").read_text())
        metrics = evaluate_run(spec.run_dir, evaluation, progress=True).metrics  # likewise its evaluation
        rows[selection] = {"spec": spec, "done": done, "metrics": metrics,
                           "seconds": sum(t["seconds"] for t in done["stages"].values())}
    points = read_points(rows["best"]["spec"].run_dir)
    write_curve(points, rows["best"]["done"]["selection"], docs / "validation-curve.png", args.concept)
    write_montage(rows["best"]["spec"].run_dir / "validation", docs / "validation-samples.png")
    write_table(rows, points, docs / "validation.md", args)
    print((docs / "validation.md").read_text())


def write_curve(points, selection: dict, path: Path, concept: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [p.step for p in points]
    for key, label in (("clip_i", "CLIP-I"), ("dino", "identity encoder"), ("clip_t", "CLIP-T"), ("objective", "objective")):
        ax.plot(steps, [getattr(p, key) for p in points], marker="o", label=label, lw=2 if key == "objective" else 1)
    ax.axvline(selection["step"], color="k", ls="--", lw=1)
    ax.annotate(f"chosen: step {selection['step']}", (selection["step"], ax.get_ylim()[1]), ha="right", va="top", fontsize=8)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation score (raw cosine)")
    ax.set_title(f"DreamBooth on the micro-world concept {concept}: validation every {steps[0]} steps")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_montage(grids: Path, path: Path) -> None:
    """Every point's sample grid side by side, labelled with its step."""
    from PIL import Image, ImageDraw

    images = [(int(p.stem.split("-")[1]), Image.open(p).convert("RGB")) for p in sorted(grids.glob("step-*.png"))]
    width, height = images[0][1].size
    sheet = Image.new("RGB", (width * len(images), height + 14), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (step, image) in enumerate(images):
        sheet.paste(image, (i * width, 14))
        draw.text((i * width + 2, 1), str(step), fill="black")
    sheet.save(path)


def write_table(rows: dict, points, path: Path, args) -> None:
    best = rows["best"]
    weights = best["done"]["selection"]["objective_weights"]
    names = " + ".join(f"{w:g} x {k}" for k, w in weights.items())
    lines = [
        f"# Validation and the best checkpoint (`python bench/validation.py --steps {args.steps} --every {args.every} "
        f"--concept {args.concept}`)", "",
        f"Chosen: {best['done']['selection']['reason']}.", "",
        f"| exported weights | step | CLIP-T | CLIP-I | identity encoder | objective ({names}) | CLIP-I normalised | "
        "identity normalised |", "|---|---|---|---|---|---|---|---|"]
    for selection, row in rows.items():
        m = row["metrics"]
        score = sum(w * m[k] for k, w in weights.items())
        lines.append(f"| {selection} | {row['done']['selection']['step']} | {m['clip_t']:.4f} | {m['clip_i']:.4f} | "
                     f"{m['dino']:.4f} | {score:.4f} | {m['clip_i_norm']:.3f} | {m['dino_norm']:.3f} |")
    overhead, total = best["done"]["validation_seconds"], best["seconds"]
    lines += ["", f"Validation: {len(points)} points of 4 prompts x 1 seed at 10 DDIM steps took {overhead:.1f} s "
              f"of the run's {total:.0f} s ({100 * overhead / total:.1f} %). Full evaluation: 12 prompts x 2 seeds, "
              "20 DDIM steps.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
