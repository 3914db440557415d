"""Batch config errors a user meets first: an unknown method is named as such, a stage of zero steps is refused."""

import pytest
import yaml

from personalize.config import load_method
from personalize.errors import ConfigError
from pipelines.config import load_batch


def test_an_unknown_method_is_named_first_with_the_available_ones(tmp_path):
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "methods": ["dreambooth"], "concepts": "c.yaml"}))
    with pytest.raises(ConfigError) as e:
        load_batch(path, ["methods=[nosuch]", "method_overrides.dreambooth.seed=1"])
    problems = e.value.problems
    assert problems[0].startswith("methods: unknown method 'nosuch'; available: ") and "dreambooth" in problems[0]
    assert "method_overrides names methods not in `methods`: ['dreambooth']" in problems[1]


def test_a_stage_of_zero_steps_is_refused():
    with pytest.raises(ConfigError) as e:
        load_method("textual_inversion", {"stages.embedding.steps": 0})
    assert any("embedding" in p and "steps" in p and "greater than or equal to 1" in p for p in e.value.problems)


def test_a_manifests_bad_rows_fail_only_their_concepts(tmp_path):
    from pipelines.config import BatchConfig, split_manifest

    rows = [{"id": "good", "images": "a", "super_category": "dog"},
            {"id": "../escape", "images": "b", "super_category": "dog"},
            {"id": "odd", "images": "c", "super_category": "dog", "kind": "plant"},
            {"id": "twin", "images": "d", "super_category": "dog"}, {"id": "twin", "images": "e", "super_category": "dog"}]
    (tmp_path / "concepts.yaml").write_text(yaml.safe_dump({"concepts": rows}))
    config = BatchConfig(model="m", methods=["dreambooth"], concepts="concepts.yaml")
    split, bad = split_manifest(config, tmp_path)
    assert [c.id for c in split.concepts] == ["good"] and split.concepts[0].images == str(tmp_path / "a")
    assert set(bad) == {"../escape", "odd", "twin"}
    assert "unsafe" in bad["../escape"] and "kind: got 'plant'" in bad["odd"]
    assert str(tmp_path / "d") in bad["twin"] and str(tmp_path / "e") in bad["twin"]
    (tmp_path / "concepts.yaml").write_text(yaml.safe_dump({"concepts": rows[1:3]}))
    with pytest.raises(ConfigError, match="concept odd: kind"):  # nothing good left: the batch is refused
        split_manifest(config, tmp_path)


def test_validation_takes_the_evaluations_scorers_and_sampler_unless_it_names_its_own(tmp_path):
    (tmp_path / "clip").mkdir()
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump({
        "model": "m", "methods": ["dreambooth"], "concepts": "c.yaml",
        "evaluation": {"prompts": "world_eval", "clip": "./clip", "dino": "dino-id", "steps": 20, "guidance_scale": 5.0},
        "validation": {"every": 50, "steps": 10}}))
    config, _ = load_batch(path)
    v = config.validation
    assert (v.prompts, v.clip, v.dino, v.guidance_scale) == ("world_eval", str(tmp_path / "clip"), "dino-id", 5.0)
    assert (v.steps, v.samples, v.every, v.selection) == (10, 1, 50, "last")  # its own, and its defaults


def test_a_missing_validation_scorer_is_refused_before_anything_starts(tmp_path, tiny_model):
    from pipelines.config import BatchConfig
    from pipelines.preflight import check_batch_resources

    config = BatchConfig(model=str(tiny_model), methods=["dreambooth"], concepts="c.yaml", evaluation=None,
                         storage=str(tmp_path / "store"), tracking={"enabled": False},
                         validation={"every": 5, "clip": str(tmp_path / "nowhere"), "dino": "dino-id"})
    with pytest.raises(ConfigError) as e:
        check_batch_resources(config, "batch.yaml")
    assert any(p.startswith("validation.clip") and "no such folder" in p and "validation: null" in p for p in e.value.problems)
