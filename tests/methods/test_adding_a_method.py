"""A new method is one YAML file plus a module of registered functions, both in a folder of their own: nothing in
the project is edited. Here such a method, with its own loss term and augmentation preset, trains through
`personalize train` and its term is logged."""

import csv
import sys
import textwrap

import pytest
import yaml

from cluster.cli import main
from personalize import augment, losses
from personalize.errors import ConfigError
from personalize.plugins import load_plugins

METHOD = """
name: sharp_inversion
paper: "a test method"
summary: "one new token, the denoising loss plus a penalty on the prediction's energy"
placeholder: {new_token: true, string: "<{concept}>", vectors: 1, init: super_category}
prompt: "a photo of a {placeholder} {super_category}"
augmentation: mirrored
stages:
  - name: invert
    trainable: [placeholder]
    steps: 3
    lr: 1.0e-2
    lr_schedule: cosine
    batch_size: 2
    losses: {diffusion: 1.0, prediction_energy: {weight: 0.5, power: 2}}
"""

PLUGIN = """
from pydantic import BaseModel, ConfigDict
from PIL import Image

from personalize.augment import Variant, augmentation, to_tensor
from personalize.losses import register
from personalize.step_record import Needs

CALLS = []


class EnergyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    power: int = 2


@register("prediction_energy", EnergyParams, lambda p: Needs(prediction=True), "mean |prediction|^power")
def prediction_energy(rec, p):
    return rec.model_pred.float().abs().pow(p.power).mean()


@augmentation("mirrored")
def mirrored(image, size, vae_scale, gen):
    CALLS.append(size)
    return Variant(to_tensor(image.resize((size, size)).transpose(Image.FLIP_LEFT_RIGHT)), None)
"""


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my_method"
    folder.mkdir()
    (folder / "sharp_inversion.yaml").write_text(METHOD)
    (folder / "sharp_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PERSONALIZE_PLUGINS", "sharp_plugin")
    yield folder
    losses.LOSS_TERMS.pop("prediction_energy", None)
    augment.AUGMENTATIONS.pop("mirrored", None)
    sys.modules.pop("sharp_plugin", None)


def test_a_method_from_its_own_folder_trains_through_the_command_line(plugin_folder, tiny_model, concept_dir, tmp_path):
    experiment = {"model": str(tiny_model), "method": str(plugin_folder / "sharp_inversion.yaml"), "output_dir": str(tmp_path / "out"),
                  "concepts": [{"id": "blob", "images": str(concept_dir), "super_category": "toy"}], "resolution": 64,
                  "latent_variants": 2, "samples": {"prompts": ["a photo of a {subject}"], "seeds": [0], "steps": 2}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    assert main(["train", str(tmp_path / "experiment.yaml")]) == 0
    run = tmp_path / "out" / "blob" / "sharp_inversion"
    assert (run / "DONE.json").is_file() and (run / "learned_embeds.safetensors").is_file()
    assert set(sys.modules["sharp_plugin"].CALLS) == {64}  # its preset made the instance variants
    with (run / "losses.csv").open() as f:
        logged = [r for r in csv.DictReader(f) if r["metric"] == "train/invert/prediction_energy"]
    assert [int(r["step"]) for r in logged] == [0, 1, 2] and all(float(r["value"]) > 0 for r in logged)
    assert '"lr_schedule": "cosine"' in (run / "config.resolved.json").read_text()


def test_a_plugin_that_cannot_be_imported_is_named_with_the_fix(monkeypatch):
    monkeypatch.setenv("PERSONALIZE_PLUGINS", "no_such_plugin_module")
    with pytest.raises(ConfigError, match="cannot import 'no_such_plugin_module'.*PYTHONPATH"):
        load_plugins()
