"""Run outputs: loadable embeddings, the done marker, and nothing finished ever redone or overwritten."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from personalize.errors import RunStateError
from personalize.faults import InjectedFault
from personalize.loop import run_method


def test_textual_inversion_outputs_load_into_a_diffusers_pipeline(spec_for, tiny_model):
    spec = spec_for("textual_inversion")
    result = run_method(spec, progress=False)
    run = result.run_dir
    assert result.status == "finished"
    assert {"learned_embeds.safetensors", "blob.a1111.safetensors", "placeholders.json", "samples.png"} <= set(result.outputs)
    embeds = load_file(str(run / "learned_embeds.safetensors"))
    assert list(embeds) == ["<blob>"] and embeds["<blob>"].shape == (1, 32)
    assert torch.equal(load_file(str(run / "blob.a1111.safetensors"))["emb_params"], embeds["<blob>"])
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    pipe.load_textual_inversion(str(run / "learned_embeds.safetensors"))
    assert pipe.tokenizer.convert_tokens_to_ids("<blob>") == 49408
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[49408], embeds["<blob>"][0])
    image = pipe("a photo of a <blob>", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0
    losses = (run / "losses.csv").read_text().splitlines()
    assert losses[0] == "step,metric,value" and len(losses) == 1 + 2 * 2  # 2 steps x (diffusion, loss)
    cfg = json.loads((run / "config.resolved.json").read_text())
    assert cfg["method"]["stages"][0]["steps"] == 2
    assert json.loads((run / "DONE.json").read_text())["config_hash"] == spec.config_hash()


def test_unet_weights_hold_only_the_trained_modules(spec_for):
    result = run_method(spec_for("custom_diffusion"), progress=False)
    unet = load_file(str(result.run_dir / "unet.safetensors"))
    assert unet and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in unet)


def test_finished_runs_are_skipped_and_never_overwritten(spec_for):
    spec = spec_for("textual_inversion")
    first = run_method(spec, progress=False)
    before = (spec.run_dir / "learned_embeds.safetensors").read_bytes()
    again = run_method(spec, progress=False)
    assert first.status == "finished" and set(first.stage_seconds) == {s.name for s in spec.method.stages}
    assert again.status == "skipped" and set(again.stage_seconds) == set(first.stage_seconds) and again.seconds == 0.0
    assert again.outputs == first.outputs
    assert (spec.run_dir / "learned_embeds.safetensors").read_bytes() == before
    other = spec_for("textual_inversion", seed=5)
    with pytest.raises(RunStateError, match="different configuration"):
        run_method(other, progress=False)


def test_a_partial_run_needs_resume(spec_for, tmp_path, monkeypatch):
    spec = spec_for("rare_two_stage")
    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"model:1:{tmp_path / 'marker'}")
    with pytest.raises(InjectedFault):
        run_method(spec, progress=False)
    with pytest.raises(RunStateError, match="--resume"):
        run_method(spec, progress=False, resume=False)
    assert run_method(spec, progress=False, resume=True).status == "finished"


def test_a_model_retrained_at_the_same_path_never_passes_for_the_one_a_run_was_trained_on(tiny_model, concept_dir, tmp_path):
    import shutil

    from personalize.models import build_tiny_model
    from tests.conftest import quick_spec

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = quick_spec("textual_inversion", model, concept_dir, tmp_path / "out")
    assert first.model_fingerprint and run_method(first, progress=False).status == "finished"
    assert quick_spec("textual_inversion", model, concept_dir, tmp_path / "out").config_hash() == first.config_hash()

    shutil.rmtree(model)
    build_tiny_model(model, seed=1)  # same architecture and path, other weights
    again = quick_spec("textual_inversion", model, concept_dir, tmp_path / "out")
    assert again.model_fingerprint != first.model_fingerprint and again.config_hash() != first.config_hash()
    with pytest.raises(RunStateError, match="different configuration"):
        run_method(again, progress=False)
    assert json.loads((first.run_dir / "DONE.json").read_text())["config_hash"] == first.config_hash()


def test_a_stage_resumed_mid_way_reports_the_whole_stages_time(spec_for, tmp_path, monkeypatch):
    from personalize import checkpoint

    spec = spec_for("textual_inversion", stage_overrides={"steps": 4}, checkpoint_every=1)
    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"embedding:3:{tmp_path / 'marker'}")
    with pytest.raises(InjectedFault):
        run_method(spec, progress=False)
    before = checkpoint.latest(spec.run_dir).cursor.stage_state["seconds"]
    assert before > 0
    outcome = run_method(spec, progress=False, resume=True)
    assert outcome.stage_seconds["embedding"] >= round(before, 2)
    assert json.loads((spec.run_dir / "DONE.json").read_text())["stages"]["embedding"]["seconds"] >= before
