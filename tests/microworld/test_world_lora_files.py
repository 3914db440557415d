"""A LoRA DreamBooth run on the micro world's model: its diffusers and kohya files, loaded by diffusers onto the
world model as a user would, give the run's own sample picture (the world's UNet has 8 latent channels and its
own CLIP, so this is not the tiny SD model's case again)."""

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from microworld.concepts import CONCEPTS, write_concepts
from personalize.config import resolve_runs
from personalize.loop import run_method
from personalize.run_settings import ExperimentConfig

MODEL = Path(__file__).resolve().parents[2] / "models" / "microworld" / "model"
CONCEPT = next(c for c in CONCEPTS if c.id == "zebra-star")


def test_a_world_lora_run_loads_in_diffusers_and_through_the_kohya_layout(tmp_path):
    manifest = write_concepts(tmp_path / "concepts", [CONCEPT])
    experiment = ExperimentConfig(
        model=str(MODEL), method="dreambooth_lora", concepts=str(manifest), output_dir=str(tmp_path / "runs"),
        resolution=64, latent_variants=1, seed=0, prior_cache_dir=str(tmp_path / "priors"),
        overrides={"stages.finetune.steps": 20, "class_prior.num_images": 2, "class_prior.inference_steps": 2},
        samples={"prompts": ["a photo of a {subject} on the beach"], "seeds": [0], "steps": 10, "heatmaps": False,
                 "every_stage": False},
    )
    spec = resolve_runs(experiment)[0]
    assert run_method(spec, progress=False).status == "finished"
    own = np.asarray(Image.open(spec.run_dir / "samples.png").convert("RGB"), dtype=np.float32)[12:] / 255
    for weight_name in ("pytorch_lora_weights.safetensors", "zebra-star.lora.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(str(MODEL), safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        base = pipe("a photo of a sks star on the beach", num_inference_steps=10, height=64, width=64,
                    generator=torch.Generator().manual_seed(0)).images[0]
        pipe.load_lora_weights(str(spec.run_dir), weight_name=weight_name)
        image = pipe("a photo of a sks star on the beach", num_inference_steps=10, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
        picture = np.asarray(image, dtype=np.float32) / 255
        assert np.abs(picture - own).mean() <= 1e-4, weight_name
        assert np.abs(picture - np.asarray(base, dtype=np.float32) / 255).mean() > 1e-3  # the adapters are in it
