"""Validation while training: points every K steps and at the end, the best `keep` points' weights kept while they
may win, the exports from the chosen point, DONE.json saying which and why, and a resumed run keeping its points.

A scorer that returns scripted scores makes the choice known in advance; the rest is the real loop on the tiny model.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from personalize.loop import NullSink, run_method
from personalize.run_settings import ValidationSpec
from personalize.validation import Schedule, best_point, checkpoints_root, objective, read_points

STEPS = 6


class ScriptedScorers:
    """Stands in for the CLIP / DINO scorers: every image of point k gets the k-th scripted scores."""

    def __init__(self, script: list[dict[str, float]]):
        self.script, self.calls = script, 0

    def reference(self, spec):
        return None

    def score(self, images, rows, reference):
        scores = self.script[self.calls]
        self.calls += 1
        return [{"tags": [], **scores} for _ in rows]


class FolderWatch(NullSink):
    """Which validation checkpoints exist when each point is reported."""

    def __init__(self, run_dir):
        self.run_dir, self.kept, self.metrics = run_dir, {}, {}

    def validated(self, step, metrics, grid):
        root = checkpoints_root(self.run_dir)
        self.kept[step] = sorted(int(d.name.split("-")[1]) for d in root.iterdir()) if root.is_dir() else []
        self.metrics[step] = metrics
        assert grid.is_file()


def scores(value: float) -> dict[str, float]:
    return {"clip_t": value, "clip_i": value / 2, "dino": 0.0}


def validated_spec(spec_for, tiny_scorers, tmp_path, checkpoint_every=0, **validation):
    settings = {"every": 2, "prompt_count": 1, "steps": 1, "prompts": "personalize_eval", "clip": str(tiny_scorers[0]),
                "dino": str(tiny_scorers[1]), **validation}
    return spec_for("dreambooth", stage_overrides={"steps": STEPS, "batch_size": 1}, validation=settings,
                    output_dir=str(tmp_path / "validated"), checkpoint_every=checkpoint_every)


def test_the_best_point_is_exported_and_only_the_best_keep_are_kept_meanwhile(spec_for, tiny_model, tiny_scorers, tmp_path):
    spec = validated_spec(spec_for, tiny_scorers, tmp_path, selection="best", keep=2)
    watch = FolderWatch(spec.run_dir)
    run_method(spec, sink=watch, progress=False, scorers=ScriptedScorers([scores(0.9), scores(0.1), scores(0.5)]))

    points = read_points(spec.run_dir)
    assert [p.step for p in points] == [2, 4, 6] and [p.stage for p in points] == ["finetune"] * 3
    assert [p.objective for p in points] == pytest.approx([0.9 + 0.45, 0.1 + 0.05, 0.5 + 0.25])  # clip_t + clip_i
    assert watch.kept == {2: [2], 4: [2, 4], 6: [2, 6]}  # the weakest of three leaves; the best two stay
    assert watch.metrics[4] == pytest.approx({"val/clip_t": 0.1, "val/clip_i": 0.05, "val/dino": 0.0, "val/objective": 0.15})
    assert sorted(p.name for p in (spec.run_dir / "validation").iterdir()) == [f"step-00000{s}.png" for s in (2, 4, 6)]
    assert not checkpoints_root(spec.run_dir).exists()  # nothing left once the choice is made

    done = json.loads((spec.run_dir / "DONE.json").read_text())
    assert done["selection"]["rule"] == "best" and done["selection"]["step"] == 2 and done["selection"]["last_step"] == 6
    assert "step 2 scored 1.3500" in done["selection"]["reason"] and done["validation_seconds"] > 0

    # the exported weights are those after step 2: the same run stopped there (randomness is per step) gives them
    short = spec_for("dreambooth", stage_overrides={"steps": 2, "batch_size": 1}, output_dir=str(tmp_path / "short"))
    run_method(short, progress=False)
    exported, reference = (load_file(str(s.run_dir / "unet.safetensors")) for s in (spec, short))
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    last = spec_for("dreambooth", stage_overrides={"steps": STEPS, "batch_size": 1}, output_dir=str(tmp_path / "last"))
    run_method(last, progress=False)
    assert any(not torch.equal(exported[k], v) for k, v in load_file(str(last.run_dir / "unet.safetensors")).items())


def test_selection_last_exports_the_last_weights_and_keeps_the_config_hash(spec_for, tiny_model, tiny_scorers, tmp_path):
    spec = validated_spec(spec_for, tiny_scorers, tmp_path, selection="last", every=4)
    plain = spec_for("dreambooth", stage_overrides={"steps": STEPS, "batch_size": 1})
    assert spec.config_hash() == plain.config_hash()  # validation that picks nothing changes no result
    assert validated_spec(spec_for, tiny_scorers, tmp_path, selection="best").config_hash() != plain.config_hash()
    run_method(spec, progress=False, scorers=ScriptedScorers([scores(0.9), scores(0.1)]))
    assert [p.step for p in read_points(spec.run_dir)] == [4, 6]  # every 4, and the last step
    done = json.loads((spec.run_dir / "DONE.json").read_text())
    assert done["selection"] == {"rule": "last", "step": 6, "objective": pytest.approx(0.15), "reason": "selection: last"}


def test_a_resumed_run_keeps_its_points_and_adds_the_rest(spec_for, tiny_model, tiny_scorers, tmp_path, monkeypatch):
    from personalize.faults import InjectedFault

    spec = validated_spec(spec_for, tiny_scorers, tmp_path, selection="best", keep=1, checkpoint_every=3)
    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"finetune:4:{tmp_path / 'marker'}")
    with pytest.raises(InjectedFault):  # points at 2 and 4, the last checkpoint at 3, then a fault
        run_method(spec, progress=False, scorers=ScriptedScorers([scores(0.2), scores(0.9)]))
    assert [p.step for p in read_points(spec.run_dir)] == [2, 4]
    run_method(spec, progress=False, scorers=ScriptedScorers([scores(0.7), scores(0.3)]))  # resumes at 3
    points = read_points(spec.run_dir)
    assert [(p.step, p.clip_t) for p in points] == [(2, 0.2), (4, 0.7), (6, 0.3)]  # 4 measured again, once
    assert best_point(points).step == 4
    assert json.loads((spec.run_dir / "DONE.json").read_text())["selection"]["step"] == 4


def test_settings_and_objective():
    assert objective({"clip_t": 0.3, "clip_i": 0.5, "dino": 0.1}, {"clip_i": 2.0, "dino": -1.0}) == pytest.approx(0.9)
    for every, total, steps in ((2, 6, [2, 4, 6]), (4, 6, [4, 6]), (7, 6, [6]), (1, 3, [1, 2, 3])):
        schedule = Schedule(ValidationSpec(every=every), total)
        assert [s for s in range(1, total + 1) if schedule.due(s)] == steps and schedule.points() == len(steps)
    with pytest.raises(ValueError, match="tto is for the final evaluation only"):
        ValidationSpec(every=10, tto=True)
    with pytest.raises(ValueError, match="at least one positive weight"):
        ValidationSpec(every=10, objective={"clip_t": 0.0})
    with pytest.raises(ValueError):
        ValidationSpec(every=0)


def test_a_run_leaving_validation_open_follows_the_methods_protocol(spec_for):
    from personalize.errors import ConfigError

    rare = spec_for("rare_two_stage", stage_overrides={"steps": 8}, validation={"prompt_count": 1})  # 16 steps in all
    assert (rare.validation.every, rare.validation.selection, rare.validation.objective) == (4, "best", {"clip_i": 1.0})
    own = spec_for("rare_two_stage", stage_overrides={"steps": 8}, validation={"every": 5, "selection": "last"})
    assert (own.validation.every, own.validation.selection) == (5, "last")  # what the run says wins
    with pytest.raises(ConfigError, match="give validation.every"):
        spec_for("dreambooth", validation={"prompt_count": 1})
