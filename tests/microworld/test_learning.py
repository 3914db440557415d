"""Learning happens: a short fixed-seed DreamBooth run on one micro-world concept, with the recipe scaled to the
world model by its recipe_scale.json, lifts identity clearly above the floor (the base model asked for the class).

Anything that breaks learning (the data path, the recipe's scale, the loss, the evaluation's references) fails it:
at the paper's unscaled lr (5e-6) the same run gives normalised CLIP-I 0.08 and identity encoder -0.11.
"""

from pathlib import Path

import pytest

from microworld.concepts import CONCEPTS, write_concepts
from personalize.config import resolve_runs
from personalize.evaluation import evaluate_run
from personalize.loop import run_method
from personalize.run_settings import EvaluationSpec, ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "microworld"
CONCEPT = next(c for c in CONCEPTS if c.id == "zebra-star")

# Measured on 2 CPU cores after these 300 steps: normalised CLIP-I 0.48 (floor -0.11, ceiling 0.41), identity
# encoder 0.03 (floor -0.11, ceiling 0.57). Pinned between these and the unscaled run's.
MIN_NORMALISED_CLIP_I = 0.35
MIN_NORMALISED_ENCODER = -0.05


def test_dreambooth_learns_a_world_concept(tmp_path):
    manifest = write_concepts(tmp_path / "concepts", [CONCEPT])
    experiment = ExperimentConfig(
        model=str(MODELS / "model"), method="dreambooth", concepts=str(manifest), output_dir=str(tmp_path / "runs"),
        resolution=64, latent_variants=8, seed=0, prior_cache_dir=str(tmp_path / "priors"),
        overrides={"stages.finetune.steps": 300, "class_prior.num_images": 8, "class_prior.inference_steps": 10,
                   "class_prior.guidance_scale": 5.0},
        samples={"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 5, "heatmaps": False, "every_stage": False},
    )
    spec = resolve_runs(experiment)[0]
    assert spec.method.stages[0].model_lr_scale > 1  # the world model's scale is what makes this learn
    run_method(spec, progress=False)
    settings = EvaluationSpec(prompts="world_eval", samples=1, scheduler="ddim", steps=10, guidance_scale=5.0, eta=0.0,
                              clip=str(MODELS / "clip"), dino=str(MODELS / "identity"))
    metrics = evaluate_run(spec.run_dir, settings, progress=False).metrics
    assert metrics["clip_i_ceiling"] > metrics["clip_i_floor"] + 0.1  # the scorer can see the concept at all
    assert metrics["clip_i"] > metrics["clip_i_floor"]
    assert metrics["clip_i_norm"] == pytest.approx(
        (metrics["clip_i"] - metrics["clip_i_floor"]) / (metrics["clip_i_ceiling"] - metrics["clip_i_floor"]))
    assert metrics["clip_i_norm"] >= MIN_NORMALISED_CLIP_I, metrics
    assert metrics["dino_norm"] >= MIN_NORMALISED_ENCODER, metrics
