"""A batch's model and scorer folders are checked in the driver before anything starts: one line per problem,
naming the file and the fix."""

import shutil

import pytest

from pipelines.batch import main
from pipelines.preflight import model_problems


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


def test_a_complete_model_and_hub_ids_pass(tiny_model):
    assert model_problems(str(tiny_model)) == []
    assert model_problems("runwayml/stable-diffusion-v1-5") == [] and model_problems("s3://b/m") == []


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae"])
def test_zero_byte_weights_are_named_with_the_fix(model_copy, component):
    weights = next((model_copy / component).glob("*.safetensors"))
    weights.write_bytes(b"")
    problems = model_problems(str(model_copy))
    assert problems == [f"model {weights} is empty (0 bytes); copy the model folder again, or point model= at a "
                        "complete diffusers pipeline folder (see `personalize tiny-model`)"]


def test_truncated_weights_and_missing_parts(model_copy):
    weights = next((model_copy / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.rmtree(model_copy / "scheduler")
    problems = model_problems(str(model_copy))
    assert any("no scheduler/ subfolder" in p for p in problems)
    assert any(str(weights) in p and "cut off" in p for p in problems)


def test_missing_folder_and_a_file(tmp_path):
    assert "no such folder" in model_problems(str(tmp_path / "nope"))[0]
    (tmp_path / "file").write_text("x")
    assert "a file, not a folder" in model_problems(str(tmp_path / "file"))[0]


def test_the_batch_refuses_before_starting_anything(tmp_path, capsys, tiny_scorers):
    config = tmp_path / "batch.yaml"
    config.write_text(f"model: {tmp_path / 'missing'}\nmethods: [dreambooth]\nconcepts: c.yaml\n"
                      f"storage: {tmp_path / 'store'}\nevaluation: {{clip: {tmp_path / 'noclip'}, dino: {tiny_scorers[1]}}}\n")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert f"model {tmp_path / 'missing'}: no such folder" in err and f"evaluation.clip {tmp_path / 'noclip'}" in err
    assert not (tmp_path / "store").exists()  # nothing created: no storage folder, no Ray, no tracking run


def test_a_config_error_found_while_planning_opens_no_tracking_run(tiny_model, concept_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "batch.yaml"
    config.write_text(f"model: {tiny_model}\nmethods: [textual_inversion]\nconcepts: [{{id: c, images: {concept_dir}, "
                      f"super_category: toy}}]\nstorage: {tmp_path / 'store'}\nevaluation: null\n"
                      "method_overrides: {textual_inversion: {stages.embedding.steps: 0}}\n")
    assert main([str(config)]) == 2
    assert "stages.embedding.steps: got 0" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "store").exists()
