"""SDXL runs: the UNet is conditioned on prompts exactly as diffusers' SDXL pipeline conditions it, a placeholder
gets a row in each text encoder, and a run's exports load into StableDiffusionXLPipeline the way LOADING.md says,
giving the run's own sample picture."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from personalize.export_formats import export_run
from personalize.loop import run_method
from tests.methods.conftest import own_sample, picture

PROMPT = "a photo of a <blob> toy"  # Custom Diffusion's subject phrase in the run's sample prompt


def sdxl_user_pipeline(model) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_run(tiny_models, tmp_path_factory):
    """Custom Diffusion on the tiny SDXL: a learned token (a row in each encoder) and cross-attention k/v."""
    from tests.conftest import draw_concept, quick_spec

    root = tmp_path_factory.mktemp("sdxl")
    spec = quick_spec("custom_diffusion", tiny_models["sdxl"], draw_concept(root / "images"), root / "out",
                      stage_overrides={"lr": 1e-2, "steps": 3},
                      samples={"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 3})
    assert run_method(spec, progress=False).status == "finished"
    return spec


def test_training_conditions_the_unet_as_the_sdxl_pipeline_does(tiny_models, spec_for):
    from personalize.models import load_components
    from personalize.run_context import prepare_run
    from personalize.text_conditioning import added_time_ids, encode_prompts

    spec = spec_for("textual_inversion", model=tiny_models["sdxl"])
    ctx = prepare_run(spec, load_components(str(tiny_models["sdxl"])), progress=False)
    comps = ctx.components
    prompts = [ctx.placeholders.fill("a photo of a {placeholder} toy"), "a photo of a toy on the beach"]
    ours = encode_prompts(comps, prompts, torch.device("cpu"))
    pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
                                     tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
                                     scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config))
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ours.hidden.shape == (2, 77, 64) and ours.pooled.shape == (2, 32)
    assert torch.allclose(ours.hidden, hidden, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)
    latents = torch.zeros(2, 4, 16, 16)
    expected = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(added_time_ids(comps, latents, torch.float32), expected.expand(2, 6))

    # one placeholder, one new row in each encoder, under the same id in both tokenizers
    [[token_id]] = ctx.placeholders.ids
    assert token_id == 49408 == comps.tokenizer_2.convert_tokens_to_ids(ctx.placeholders.tokens[0][0])
    rows = {n: m.get_input_embeddings().rows.shape for n, m in comps.text_models.items()}
    assert rows == {"text_encoder": (1, 32), "text_encoder_2": (1, 32)}


def test_the_diffusers_export_loads_into_the_sdxl_pipeline_as_its_guide_says(sdxl_run, tiny_models, tmp_path):
    out = tmp_path / "diffusers"
    export_run(sdxl_run.run_dir, "diffusers", out)
    guide = (out / "LOADING.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in guide
    assert {p.name for p in out.iterdir()} == {"learned_embeds.safetensors", "learned_embeds_2.safetensors",
                                               "pytorch_custom_diffusion_weights.safetensors", "LOADING.md"}
    first, second = load_file(str(out / "learned_embeds.safetensors")), load_file(str(out / "learned_embeds_2.safetensors"))
    assert first.keys() == second.keys() == {"<blob>"} and first["<blob>"].shape == second["<blob>"].shape == (1, 32)

    pipe = sdxl_user_pipeline(tiny_models["sdxl"])
    base = picture(pipe, PROMPT.replace("<blob> ", ""))
    steps = [line for line in guide.splitlines() if line.startswith("pipe.")]
    assert len(steps) == 3
    for step in steps:  # the guide's own lines, run from the export folder
        exec(re.sub(r'"([^"]+\.safetensors)"', lambda m: repr(str(out / m.group(1))), step).replace('"."', repr(str(out))),
             {"pipe": pipe})
    image = picture(pipe, PROMPT)
    assert float(np.abs(image - own_sample(sdxl_run.run_dir)).mean()) <= 1e-4
    assert float(np.abs(image - base).mean()) > 1e-2


def test_the_a1111_embedding_holds_both_encoders_rows_and_the_pipeline_export_loads_alone(sdxl_run, tmp_path):
    export_run(sdxl_run.run_dir, "a1111", tmp_path / "a1111")
    embedding = load_file(str(tmp_path / "a1111" / "blob.a1111.safetensors"))
    assert {k: tuple(v.shape) for k, v in embedding.items()} == {"clip_l": (1, 32), "clip_g": (1, 32)}
    learned = load_file(str(sdxl_run.run_dir / "learned_embeds_2.safetensors"))["<blob>"]
    assert torch.equal(embedding["clip_g"], learned)

    export_run(sdxl_run.run_dir, "pipeline", tmp_path / "pipeline")
    pipe = sdxl_user_pipeline(tmp_path / "pipeline")
    assert pipe.tokenizer.convert_tokens_to_ids("<blob>") == pipe.tokenizer_2.convert_tokens_to_ids("<blob>") == 49408
    assert pipe.text_encoder_2.get_input_embeddings().weight.shape[0] == 49409
    assert float(np.abs(picture(pipe, PROMPT) - own_sample(sdxl_run.run_dir)).mean()) <= 1e-4


def test_test_time_optimisation_tunes_the_rows_of_both_encoders(sdxl_run):
    from personalize.sampling import LoadedRun
    from personalize.tokens import joined_rows
    from personalize.tto import optimize_for_prompt

    run = LoadedRun(sdxl_run.run_dir, device="cpu")
    trained = run.trained_rows.clone()
    assert trained.shape == (1, 64)  # the token's CLIP-L row and its bigG row, joined
    tuned = optimize_for_prompt(run, "a photo of a {} on the beach", steps=2, progress=False)
    assert torch.equal(tuned, joined_rows(run.components))
    assert (tuned[:, :32] != trained[:, :32]).any() and (tuned[:, 32:] != trained[:, 32:]).any()
