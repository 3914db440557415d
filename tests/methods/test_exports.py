"""`personalize export`: every format written from a finished run and loaded back the way its tool loads it, giving
the run's own sample picture."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from personalize.cli import main
from personalize.errors import RunStateError
from personalize.export_formats import CUSTOM_DIFFUSION, export_run
from tests.methods.conftest import own_sample, picture, user_pipeline

TOKEN_PROMPT = "a photo of a <blob> toy"  # Custom Diffusion's subject phrase in the runs' sample prompt


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_diffusers_export_of_a_lora_run_loads_with_load_lora_weights(lora_run, tiny_model, tmp_path):
    out = tmp_path / "diffusers"
    assert main([ "export", str(lora_run.run_dir), "--format", "diffusers", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"pytorch_lora_weights.safetensors", "LOADING.md"}
    assert 'pipe.load_lora_weights(".", weight_name="pytorch_lora_weights.safetensors")' in (out / "LOADING.md").read_text()
    pipe = user_pipeline(tiny_model)
    pipe.load_lora_weights(str(out))
    assert close(picture(pipe), own_sample(lora_run.run_dir)) <= 1e-4


def test_diffusers_export_of_custom_diffusion_loads_the_token_and_the_attention_processors(custom_diffusion_run, tiny_model, tmp_path):
    run = custom_diffusion_run.run_dir
    out = tmp_path / "diffusers"
    export_run(run, "diffusers", out)
    assert {p.name for p in out.iterdir()} == {"learned_embeds.safetensors", CUSTOM_DIFFUSION, "LOADING.md"}
    layers = load_file(str(out / CUSTOM_DIFFUSION))
    trained = {k: v for k, v in layers.items() if v.numel()}
    assert len(trained) == 7 * 2 and all(k.endswith(("attn2.processor.to_k_custom_diffusion.weight",
                                                     "attn2.processor.to_v_custom_diffusion.weight")) for k in trained)
    assert sorted(set(layers) - set(trained)) == sorted(k for k in layers if k.endswith("attn1.processor"))  # 7 untrained
    pipe = user_pipeline(tiny_model)
    base = picture(pipe, TOKEN_PROMPT.replace("<blob> ", ""))
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    pipe.unet.load_attn_procs(str(out), weight_name=CUSTOM_DIFFUSION, _pipeline=pipe)  # as LOADING.md says
    image = picture(pipe, TOKEN_PROMPT)
    assert close(image, own_sample(run)) <= 1e-4
    assert close(image, base) > 1e-2


@pytest.mark.parametrize("which", ["lora_run", "custom_diffusion_run"])
def test_the_merged_pipeline_loads_alone_and_gives_the_runs_sample(which, request, tmp_path):
    spec = request.getfixturevalue(which)
    out = tmp_path / "pipeline"
    export_run(spec.run_dir, "pipeline", out)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in pipe.unet.state_dict())  # merged: a plain UNet
    prompt = TOKEN_PROMPT if which == "custom_diffusion_run" else "a photo of a sks toy"
    if which == "custom_diffusion_run":
        assert pipe.tokenizer.convert_tokens_to_ids("<blob>") == 49408
        assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == 49409
    assert close(picture(pipe, prompt), own_sample(spec.run_dir)) <= 1e-4


def test_kohya_and_a1111_exports_hold_the_runs_files(lora_run, custom_diffusion_run, tmp_path):
    export_run(lora_run.run_dir, "kohya", tmp_path / "kohya")
    assert [p.name for p in (tmp_path / "kohya").iterdir()] == ["blob.lora.safetensors"]
    assert (tmp_path / "kohya" / "blob.lora.safetensors").read_bytes() == (lora_run.run_dir / "blob.lora.safetensors").read_bytes()
    export_run(custom_diffusion_run.run_dir, "a1111", tmp_path / "a1111")
    embedding = load_file(str(tmp_path / "a1111" / "blob.a1111.safetensors"))
    assert set(embedding) == {"emb_params"} and embedding["emb_params"].shape == (1, 32)


def test_an_export_never_overwrites_and_a_whole_unet_run_is_pointed_at_the_pipeline_format(spec_for, lora_run, tmp_path):
    from personalize.loop import run_method

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(RunStateError, match="not empty"):
        export_run(lora_run.run_dir, "diffusers", taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    dreambooth = spec_for("dreambooth")
    run_method(dreambooth, progress=False)
    with pytest.raises(RunStateError, match="--format pipeline"):
        export_run(dreambooth.run_dir, "diffusers", tmp_path / "db")
