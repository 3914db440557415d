"""`personalize demo`: a tiny model, two drawn concepts, every core method for a few steps, one table."""

from __future__ import annotations

import time
from pathlib import Path

from personalize.config import ExperimentConfig, resolve_runs
from personalize.models import build_tiny_model
from personalize.synthetic import DEFAULT_CONCEPTS, write_concepts
from personalize.training import outcome_table, train_one

DEMO_METHODS = ("textual_inversion", "dreambooth", "rare_two_stage")
DEMO_OVERRIDES = {"class_prior.num_images": 8, "class_prior.inference_steps": 10}


def run_demo(output: Path, steps_scale: float = 1.0) -> int:
    began = time.perf_counter()
    model = output / "tiny-model"
    if not (model / "model_index.json").is_file():
        build_tiny_model(model)
    manifest = write_concepts(output / "concepts", DEFAULT_CONCEPTS[:2])
    outcomes = []
    for method in DEMO_METHODS:
        overrides = DEMO_OVERRIDES if method == "dreambooth" else {}
        experiment = ExperimentConfig(
            model=str(model), method=method, concepts=str(manifest), output_dir=str(output / "runs"),
            resolution=64, latent_variants=4, steps_scale=0.02 * steps_scale, prior_cache_dir=str(output / "class-priors"),
            overrides=overrides,
        )
        for spec in resolve_runs(experiment):
            outcomes.append(train_one(spec, resume=True))
    print()
    print(outcome_table(outcomes))
    print(f"\n{len(outcomes)} runs in {time.perf_counter() - began:.0f} s; outputs under {output / 'runs'}")
    return 0 if any(o.status != "failed" for o in outcomes) else 1
