"""The quality benchmark of the micro world: every method on held-out concepts, several seeds, scored by the
world CLIP (CLIP-T, CLIP-I) and the self-supervised identity encoder (in DINO's role), as mean +- std over
concepts and seeds, with the text-alignment vs identity scatter plot."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from microworld.concepts import CONCEPTS, write_concepts, write_pair
from personalize.config import EvaluationSpec, ExperimentConfig, available_methods, resolve_runs
from personalize.evaluation import evaluate_run
from personalize.stages import run_method

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models" / "microworld"

# Stage lengths relative to each paper recipe, so the reduced setting fits in under an hour on two CPU cores
# (the world's images are 64 px with 16x16 latents; the full setting uses the papers' step counts).
REDUCED_SCALES = {"textual_inversion": 0.2, "dreambooth": 0.5, "rare_two_stage": 1.0, "attndreambooth": 0.5, "core": 0.3,
                  "custom_diffusion": 1.0, "disendiff": 1.0}
REDUCED_PRIORS = 50  # class-prior images per set in the reduced setting (papers: 200)


@dataclass
class Setting:
    concepts: int = 2
    seeds: int = 1
    methods: list[str] = field(default_factory=available_methods)
    scales: dict[str, float] = field(default_factory=lambda: dict(REDUCED_SCALES))
    class_images: int | None = REDUCED_PRIORS
    samples: int = 2  # images per evaluation prompt
    eval_steps: int = 25
    latent_variants: int = 8

    @classmethod
    def full(cls) -> Setting:
        return cls(concepts=len(CONCEPTS), seeds=3, scales={m: 1.0 for m in REDUCED_SCALES}, class_images=None, samples=4,
                   eval_steps=50)

    @classmethod
    def smoke(cls, methods: list[str]) -> Setting:
        return cls(concepts=1, seeds=1, methods=methods, scales={m: 0.01 for m in REDUCED_SCALES}, class_images=2,
                   samples=1, eval_steps=2, latent_variants=1)


def evaluation(setting: Setting, models: Path) -> EvaluationSpec:
    """One protocol for every method (DDIM, guidance 5), so the scores compare methods, not samplers."""
    return EvaluationSpec(prompts="world_eval", samples=setting.samples, scheduler="ddim", steps=setting.eval_steps,
                          guidance_scale=5.0, eta=0.0, clip=str(models / "clip"), dino=str(models / "identity"))


def run(out: Path, setting: Setting, models: Path = MODELS, progress: bool = True) -> pd.DataFrame:
    out = out.resolve()  # run configs resolve relative paths against the concepts folder, not the cwd
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_concepts(out / "concepts", CONCEPTS[: setting.concepts])
    pair = write_pair(out / "concepts", CONCEPTS[0], CONCEPTS[1])
    settings = evaluation(setting, models)
    rows = []
    for method in setting.methods:
        for seed in range(setting.seeds):
            overrides = {"class_prior.num_images": setting.class_images} if setting.class_images else {}
            concepts = [pair] if method == "disendiff" else str(manifest)
            experiment = ExperimentConfig(
                model=str(models / "model"), method=method, concepts=concepts, output_dir=str(out / "runs" / f"seed-{seed}"),
                seed=seed, resolution=64, latent_variants=setting.latent_variants, steps_scale=setting.scales.get(method, 1.0),
                prior_cache_dir=str(out / "class-priors"), overrides=overrides,
                samples={"prompts": ["a photo of a {subject} on the beach"], "seeds": [0], "steps": 10, "heatmaps": False},
            )
            for spec in resolve_runs(experiment, base_dir=out / "concepts"):
                began = time.perf_counter()
                run_method(spec, progress=progress)
                trained = time.perf_counter() - began
                result = evaluate_run(spec.run_dir, settings, progress=False)
                m = result.metrics
                rows.append({"method": method, "concept": spec.concept.id, "seed": seed, "clip_t": m["clip_t"],
                             "clip_i": m["clip_i"], "identity": m["dino"], "train_seconds": round(trained, 1),
                             "steps": sum(s.steps for s in spec.method.stages), "scale": setting.scales.get(method, 1.0)})
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "quality_runs.csv", index=False)
    return frame


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby("method")
    table = pd.DataFrame({
        f"{metric}_{stat}": getattr(grouped[metric], stat)() for metric in ("clip_t", "clip_i", "identity") for stat in ("mean", "std")
    })
    table["runs"] = grouped.size()
    table["steps"] = grouped["steps"].first()
    table["train_seconds"] = grouped["train_seconds"].mean().round(1)
    return table.reset_index()


def markdown(table: pd.DataFrame, setting: Setting, minutes: float) -> str:
    def cell(row, metric):
        std = row[f"{metric}_std"]
        return f"{row[f'{metric}_mean']:.4f} ± {0.0 if math.isnan(std) else std:.4f}"

    lines = ["| method | CLIP-T | CLIP-I | identity | runs | steps | train s/run |", "|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['method']} | {cell(row, 'clip_t')} | {cell(row, 'clip_i')} | {cell(row, 'identity')} | "
                     f"{int(row['runs'])} | {int(row['steps'])} | {row['train_seconds']} |")
    lines += ["", f"Raw cosines, mean ± std over {setting.concepts} concept(s) x {setting.seeds} seed(s) "
              f"(DisenDiff: one two-subject photo x seeds); {setting.samples} image(s) per prompt of `world_eval`, DDIM "
              f"{setting.eval_steps} steps, guidance 5. Stage lengths relative to the papers: "
              + ", ".join(f"{m} x{s:g}" for m, s in setting.scales.items() if m in setting.methods)
              + (f"; {setting.class_images} class-prior images per set." if setting.class_images else "."),
              f"Wall time: {minutes:.1f} min."]
    return "\n".join(lines) + "\n"


def write_report(frame: pd.DataFrame, setting: Setting, folder: Path, minutes: float) -> dict[str, Path]:
    from personalize.report import scatter_plot

    folder.mkdir(parents=True, exist_ok=True)
    table = summary(frame)
    paths = {"markdown": folder / "quality.md", "csv": folder / "quality.csv", "scatter": folder / "quality.png",
             "runs": folder / "quality_runs.csv"}
    table.to_csv(paths["csv"], index=False)
    frame.to_csv(paths["runs"], index=False)
    paths["markdown"].write_text(markdown(table, setting, minutes))
    scatter_plot(frame.rename(columns={"identity": "dino"}), paths["scatter"], labels={"dino": "identity encoder"})
    (folder / "quality_setting.json").write_text(json.dumps(setting.__dict__, indent=1))
    return paths
