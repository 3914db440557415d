"""Strict configuration: every YAML validates, every problem is reported at once with key, value, expectation."""

from pathlib import Path

import pytest
import yaml

from personalize.config import (
    available_methods,
    load_experiment,
    load_manifest,
    load_method,
    parse_override,
    split_overrides,
    validate,
)
from personalize.errors import ConfigError
from personalize.locations import CONFIG_ROOT
from personalize.prompts import available_prompt_sets, load_prompt_set
from personalize.run_settings import ExperimentConfig


@pytest.mark.parametrize("name", available_methods())
def test_every_method_yaml_validates(name):
    method = load_method(name)
    assert method.name == name
    assert all(stage.steps > 0 for stage in method.stages)


def test_the_seven_methods_exist():
    assert set(available_methods()) >= {
        "textual_inversion", "dreambooth", "rare_two_stage", "attndreambooth", "core", "custom_diffusion", "disendiff"}


@pytest.mark.parametrize("path", sorted((CONFIG_ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_yaml_validates(path):
    """Schema, method and overrides (the concepts manifest it names is made by a command, not committed)."""
    raw = yaml.safe_load(path.read_text())
    method_overrides, _ = split_overrides(raw.get("overrides") or {})
    experiment = validate(ExperimentConfig, {**raw, "overrides": method_overrides}, str(path))
    assert load_method(experiment.method, experiment.overrides).stages


@pytest.mark.parametrize("name", available_prompt_sets())
def test_every_prompt_file_parses(name):
    items = load_prompt_set(name)
    assert len(items) >= (1 if name == "world_captions" else 10)  # the world's grammar has one photo caption
    assert all(item.template.count("{}") == 1 for item in items)


def test_method_numbers_are_the_papers():
    adb = load_method("attndreambooth")
    assert [(s.steps, s.lr, s.batch_size) for s in adb.stages] == [(60, 1e-3, 8), (100, 2e-5, 8), (500, 2e-6, 8)]
    assert [s.losses["attn_mean_var_reg"].params for s in adb.stages] == [
        {"mu": 0.1, "var": 0.0}, {"mu": 2.0, "var": 5.0}, {"mu": 2.0, "var": 5.0}]
    core = load_method("core")
    assert core.stages[0].embedding_norm_lock.window(300) == (120, 180)
    assert core.stages[0].losses["core_context_embedding"].weight == 1.5e-4
    assert core.test_time.steps == 10 and core.test_time.lr == 5e-4
    db = load_method("dreambooth")
    assert db.stages[0].lr == 5e-6 and db.class_prior.num_images == 200 and db.stages[0].use_class_prior


def write(tmp_path: Path, data: dict, name="exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_all_problems_of_a_file_are_reported_together(tmp_path):
    path = write(tmp_path, {"model": "m", "method": "dreambooth", "concepts": [{"id": "a", "images": "x", "super_category": "dog"}],
                            "resolution": "big", "sed": 3, "mixed_precision": "fp8"})
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    problems = err.value.problems
    assert len(problems) == 3
    text = str(err.value)
    assert str(path) in text
    assert "resolution: got 'big'" in text and "valid integer" in text
    assert "sed: got 3; no such key" in text
    assert "mixed_precision: got 'fp8'" in text and "'bf16'" in text


def test_stage_errors_name_the_stage_not_its_index(tmp_path):
    method = yaml.safe_load((CONFIG_ROOT / "methods" / "attndreambooth.yaml").read_text())
    method["stages"][1]["lr"] = -1
    method["stages"][2]["losses"]["attn_mean_var_reg"]["sigma"] = 3
    path = write(tmp_path, method, "m.yaml")
    with pytest.raises(ConfigError) as err:
        load_method(str(path))
    text = str(err.value)
    assert "stages.attention_refinement.lr: got -1; Input should be greater than 0" in text
    assert "stages.subject_identity" in text and "sigma" in text


def test_unknown_loss_term_and_selector_are_errors(tmp_path):
    method = yaml.safe_load((CONFIG_ROOT / "methods" / "textual_inversion.yaml").read_text())
    method["stages"][0]["losses"] = {"difusion": 1.0}
    with pytest.raises(ConfigError, match="unknown loss term 'difusion'"):
        load_method(str(write(tmp_path, method, "m.yaml")))


def test_overrides_address_stages_by_name(tmp_path):
    path = write(tmp_path, {"model": "m", "method": "attndreambooth", "concepts": [{"id": "a", "images": "x", "super_category": "dog"}],
                            "overrides": {"stages.subject_identity.steps": 7}})
    runs = load_experiment(path, ["stages.embedding_alignment.lr=0.5", "seed=9"])
    stages = runs[0].method.stages
    assert stages[2].steps == 7 and stages[0].lr == 0.5 and runs[0].seed == 9
    with pytest.raises(ConfigError, match=r"no item named 'identity' \(have: \['embedding_alignment'"):
        load_experiment(path, ["stages.identity.steps=3"])


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=200") == ("a.b", 200)
    assert parse_override("x=1.5e-4") == ("x", 1.5e-4)
    assert parse_override("flag=true") == ("flag", True)
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


@pytest.mark.parametrize("bad_id", ["../etc", "my concept", "a/b", "ü"])
def test_unsafe_concept_ids_are_rejected(bad_id):
    with pytest.raises(Exception, match="unsafe"):
        ExperimentConfig(model="m", method="dreambooth", concepts=[{"id": bad_id, "images": "x", "super_category": "dog"}])


@pytest.mark.parametrize("suffix", [".yaml", ".jsonl", ".csv"])
def test_manifests_in_three_formats(tmp_path, suffix):
    rows = [{"id": "dog1", "images": "dogs/1", "super_category": "dog", "kind": "animate"},
            {"id": "mug", "images": "/abs/mug", "super_category": "mug"}]
    path = tmp_path / f"concepts{suffix}"
    if suffix == ".yaml":
        path.write_text(yaml.safe_dump({"concepts": rows}))
    elif suffix == ".jsonl":
        import json
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path.write_text("id,images,super_category,kind\ndog1,dogs/1,dog,animate\nmug,/abs/mug,mug,\n")
    concepts = load_manifest(path)
    assert [c.id for c in concepts] == ["dog1", "mug"]
    assert concepts[0].images == str(tmp_path / "dogs/1") and concepts[1].images == "/abs/mug"
    assert concepts[0].kind == "animate" and concepts[1].kind == "object"


def test_manifest_reports_every_bad_row(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "ok", "images": "a", "super_category": "dog"}\n{"id": "bad id", "images": "b"}\n'
                    '{"id": "x", "images": "c", "super_category": "cat", "colour": "red"}\n'
                    '{"id": "ok", "images": "d", "super_category": "cat"}\n')
    with pytest.raises(ConfigError) as err:
        load_manifest(path)
    text = str(err.value)
    assert "unsafe" in text and "colour" in text and "appears more than once" in text


def test_paths_resolve_once_relative_to_the_file_that_names_them(tmp_path):
    (tmp_path / "data" / "dog").mkdir(parents=True)
    (tmp_path / "data" / "concepts.yaml").write_text(yaml.safe_dump({"concepts": [{"id": "d", "images": "dog", "super_category": "dog"}]}))
    (tmp_path / "exp").mkdir()
    inline = {"id": "c", "images": "../cat", "super_category": "cat"}
    path = write(tmp_path / "exp", {"model": "../model", "method": "dreambooth", "concepts": "../data/concepts.yaml"})
    (run,) = load_experiment(path)
    assert run.concept.images == str(tmp_path / "data" / "dog")
    assert run.model == str(tmp_path / "model")
    path = write(tmp_path / "exp", {"model": "org/hub-model", "method": "dreambooth", "concepts": [inline]}, "inline.yaml")
    (run,) = load_experiment(path)
    assert run.concept.images == str(tmp_path / "cat") and run.model == "org/hub-model"


def test_steps_scale_shortens_every_stage_and_the_norm_lock_window():
    from personalize.config import scale_steps

    core = scale_steps(load_method("core"), 0.1)
    assert [s.steps for s in core.stages] == [30, 100]
    assert core.stages[0].embedding_norm_lock.window(30) == (12, 18)  # fractions follow the stage
    searched = load_method("core", {"stages.embedding.steps": 50})
    assert searched.stages[0].embedding_norm_lock.window(50) == (20, 30)


def test_norm_lock_windows_in_steps_or_fractions():
    from pydantic import ValidationError

    from personalize.method_spec import NormLockSpec

    assert NormLockSpec(start=3, end=6).window(100) == (3, 6)
    assert NormLockSpec(start_fraction=0.4, end_fraction=0.6).window(10) == (4, 6)
    for bad in ({}, {"start": 3}, {"start": 3, "end": 6, "start_fraction": 0.1, "end_fraction": 0.2},
                {"start": 6, "end": 3}, {"start_fraction": 0.6, "end_fraction": 0.4}):
        with pytest.raises(ValidationError):
            NormLockSpec(**bad)
    with pytest.raises(ConfigError, match="beyond the stage's 100 steps"):
        load_method("core", {"stages.embedding.embedding_norm_lock": {"start": 120, "end": 180}, "stages.embedding.steps": 100})
