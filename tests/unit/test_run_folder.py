"""A run folder's states, read and written only through personalize/run_folder.py."""

import json

import pytest

from personalize import run_folder
from personalize.errors import RunStateError


def test_a_finished_folder_records_its_hash_timings_and_outputs(tmp_path):
    run = tmp_path / "ball" / "dreambooth"
    run.mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps({"model": {"index": 0, "seconds": 2.5, "steps": 10}}))
    assert run_folder.owner(run) is None and not run_folder.is_finished(run)
    run_folder.write_done(run, "0123456789abcdef", ["unet.safetensors"])
    done = run_folder.read_done(run)
    assert done["config_hash"] == "0123456789abcdef" and done["outputs"] == ["unet.safetensors"]
    assert run_folder.stage_seconds(done) == {"model": 2.5}
    assert run_folder.owner(run) == "0123456789abcdef"
    assert not (run / "DONE.json.tmp").exists()


def test_another_configuration_is_refused_with_the_fix(tmp_path):
    class Spec:  # a run whose config hash is aaaa today and was cccc when the hash named folder locations
        def config_hash(self):
            return "aaaa"

        def owns(self, found):
            return found in ("aaaa", "cccc")

    run_folder.check_owner(tmp_path, "aaaa", Spec())
    run_folder.check_owner(tmp_path, "cccc", Spec())
    with pytest.raises(RunStateError, match=r"hash bbbb, this one aaaa.*never overwritten.*another output_dir"):
        run_folder.check_owner(tmp_path, "bbbb", Spec())


def test_a_failure_keeps_its_reason(tmp_path):
    run = tmp_path / "bad" / "textual_inversion"
    assert run_folder.failure_reason(run) is None
    run_folder.write_failed(run, "concept bad: no images in /x", "cafe")
    assert run_folder.failure_reason(run) == "concept bad: no images in /x"
    assert json.loads((run / "FAILED.json").read_text())["config_hash"] == "cafe"


def test_only_finished_runs_are_found_and_evaluations_are_not_runs(tmp_path):
    for name in ("a/ti", "b/ti", "a/ti/eval/x"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("a/ti", "a/ti/eval/x"):
        (tmp_path / name / "DONE.json").write_text("{}")
    assert run_folder.find_finished([tmp_path]) == [tmp_path / "a" / "ti"]
    assert run_folder.find_finished([tmp_path / "a" / "ti", tmp_path]) == [tmp_path / "a" / "ti"]
    with pytest.raises(RunStateError, match="not a finished run.*train it first"):
        run_folder.finished_spec(tmp_path / "b" / "ti")
