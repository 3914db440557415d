"""Optimizers and learning-rate schedules are named choices of a stage; the schedules' values by hand."""

import math

import pytest
import torch

from personalize.errors import ConfigError
from personalize.method_spec import StageSpec
from personalize.optim import lr_at, make_optimizer
from personalize.run_settings import ConceptSpec, RunSpec, SampleSpec


def stage(**extra) -> StageSpec:
    return StageSpec(name="s", trainable=["unet"], steps=10, lr=1.0, losses={"diffusion": 1.0}, **extra)


def test_constant_after_a_linear_warmup():
    s = stage(warmup_steps=4)
    assert [lr_at(s, k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_lr_after_the_warmup_like_diffusers():
    s = stage(warmup_steps=2, lr_schedule="cosine")
    assert [lr_at(s, k) for k in range(2)] == [0.5, 1.0]
    assert lr_at(s, 2) == pytest.approx(1.0)  # the first update after the warmup: the full rate
    assert lr_at(s, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # half-way: lr / 2
    assert lr_at(s, 9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_the_optimizer_is_built_by_name_with_the_stages_settings():
    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw = make_optimizer(params, stage(weight_decay=0.5))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.5
    assert isinstance(make_optimizer(params, stage(optimizer="sgd")), torch.optim.SGD)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown lr_schedule 'linear'; available: constant, cosine"):
        stage(lr_schedule="linear")
    from personalize.config import load_method

    with pytest.raises(ConfigError, match="unknown optimizer 'lion'"):
        load_method("dreambooth", {"stages.finetune.optimizer": "lion"})


def test_the_defaults_leave_a_finished_runs_hash_as_it_was_and_a_choice_changes_it():
    from personalize.config import load_method

    def spec(method):
        return RunSpec(model="runwayml/stable-diffusion-v1-5", method=method, concept=ConceptSpec(id="dog", images="/x", super_category="dog"), output_dir="o",
                       device="cpu", gradient_checkpointing=False, prior_cache_dir=None, samples=SampleSpec())

    default = spec(load_method("dreambooth"))
    assert default.config_hash() == spec(load_method("dreambooth", {"stages.finetune.optimizer": "adamw"})).config_hash()
    assert default.config_hashes()[1] == "2443143c4801db91"  # the hash DreamBooth runs carried before these fields existed
    assert default.owns("2443143c4801db91")
    assert default.config_hash() != spec(load_method("dreambooth", {"stages.finetune.lr_schedule": "cosine"})).config_hash()
    assert default.config_hash() != spec(load_method("dreambooth", {"augmentation_words": False})).config_hash()
