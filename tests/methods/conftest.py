"""Finished runs shared by the export tests, and how a user of diffusers makes the run's sample picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from personalize.loop import run_method

RANK, ALPHA = 2, 8.0  # alpha != rank: a loader that ignored alpha would scale the adapters 4x wrong
PROMPT = "a photo of a sks toy"  # the run's sample prompt "a photo of a {subject}"


@pytest.fixture(scope="session")
def lora_run(tiny_model, tmp_path_factory):
    from tests.conftest import draw_concept, quick_spec

    root = tmp_path_factory.mktemp("lora")
    spec = quick_spec("dreambooth_lora", tiny_model, draw_concept(root / "images"), root / "out",
                      stage_overrides={"lr": 1e-2, "steps": 3, "lora": {"rank": RANK, "alpha": ALPHA}},
                      samples={"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 3})
    outcome = run_method(spec, progress=False)
    assert outcome.status == "finished"
    return spec


def own_sample(run_dir) -> np.ndarray:
    """The run's sample (its grid holds one image below a 12-pixel label band)."""
    grid = np.asarray(Image.open(run_dir / "samples.png").convert("RGB"), dtype=np.float32) / 255
    return grid[12:]


def user_pipeline(tiny_model) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(pipe, prompt: str = PROMPT) -> np.ndarray:
    """The picture of the runs' sample settings (3 DDIM steps, 64 px, seed 0, guidance 7.5: SDXL's pipeline would
    take 5 by default)."""
    image = pipe(prompt, num_inference_steps=3, height=64, width=64, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.float32) / 255


@pytest.fixture(scope="session")
def custom_diffusion_run(tiny_model, tmp_path_factory):
    """A learned token and cross-attention k/v weights."""
    from tests.conftest import draw_concept, quick_spec

    root = tmp_path_factory.mktemp("cd")
    spec = quick_spec("custom_diffusion", tiny_model, draw_concept(root / "images"), root / "out",
                      stage_overrides={"lr": 1e-2, "steps": 3},
                      samples={"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 3})
    assert run_method(spec, progress=False).status == "finished"
    return spec
