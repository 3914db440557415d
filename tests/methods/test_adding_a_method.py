"""A new method is one YAML file plus registered functions: nothing in the project is edited. Here a method
from a temporary folder with its own loss term and augmentation preset trains end to end, its term logged."""

import csv

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from personalize import augment, losses
from personalize.record import Needs
from personalize.stages import run_method
from tests.conftest import quick_spec

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


class EnergyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    power: int = 2


def prediction_energy(rec, p: EnergyParams) -> torch.Tensor:
    return rec.model_pred.float().abs().pow(p.power).mean()


@pytest.fixture
def registered(monkeypatch):
    """The method's functions, registered for this test only."""
    calls = []

    def mirrored(image, size, vae_scale, gen):
        calls.append(size)
        return augment.Variant(augment.to_tensor(image.resize((size, size)).transpose(0)), None)

    monkeypatch.setitem(augment.AUGMENTATIONS, "mirrored", mirrored)
    monkeypatch.setitem(losses.LOSS_TERMS, "prediction_energy", losses.LossTerm(
        "prediction_energy", prediction_energy, EnergyParams, lambda p: Needs(prediction=True), "mean |prediction|^power"))
    return calls


def test_a_method_from_a_yaml_and_registered_functions_trains(registered, tiny_model, concept_dir, tmp_path):
    path = tmp_path / "methods" / "sharp_inversion.yaml"
    path.parent.mkdir()
    path.write_text(METHOD)
    spec = quick_spec(str(path), tiny_model, concept_dir, tmp_path / "out", stage_overrides={"steps": 3})
    assert spec.method.stages[0].lr_schedule == "cosine" and spec.method.augmentation == "mirrored"
    outcome = run_method(spec, progress=False)
    assert outcome.status == "finished" and spec.run_dir.name == "sharp_inversion"
    assert registered and set(registered) == {64}  # the preset made the instance variants
    with (spec.run_dir / "losses.csv").open() as f:
        logged = [r for r in csv.DictReader(f) if r["metric"] == "train/invert/prediction_energy"]
    assert [int(r["step"]) for r in logged] == [0, 1, 2] and all(float(r["value"]) > 0 for r in logged)
    assert (spec.run_dir / "learned_embeds.safetensors").is_file()
