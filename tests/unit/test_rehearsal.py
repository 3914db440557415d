"""The rehearsal methods: valid method files whose runs are trained by the registered runner, in-process as on
Ray, leaving the files of a finished run without loading a model."""

import json

import pandas as pd

import pipelines.rehearsal  # noqa: F401  (registers the runners, as PERSONALIZE_PLUGINS does)
from personalize.config import load_method, resolve_runs
from personalize.run_settings import ExperimentConfig
from personalize.runners import runner_for
from personalize.train_many import train_one
from pipelines.rehearsal import METHODS, STEP_VARIABLE, rehearse, write_methods
from tests.conftest import draw_concept


def test_a_rehearsal_run_leaves_a_finished_run_and_is_not_redone(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(STEP_VARIABLE, "0")
    paths = write_methods(tmp_path / "methods")
    assert [load_method(str(p)).name for p in paths] == list(METHODS)
    assert runner_for("rehearsal_two_stage") is rehearse and runner_for("textual_inversion").__name__ == "run_method"
    spec, = resolve_runs(ExperimentConfig.model_validate({
        "model": str(tiny_model), "method": str(paths[1]), "output_dir": str(tmp_path / "runs"),
        "concepts": [{"id": "ball", "images": str(draw_concept(tmp_path / "ball", n=2)), "super_category": "ball"}]}))
    outcome = train_one(spec, progress=False)
    assert outcome.status == "finished" and set(outcome.stage_seconds) == {"token", "model"}
    losses = pd.read_csv(spec.run_dir / "losses.csv")
    assert list(losses["step"]) == list(range(30))
    assert sorted(p.name for p in (spec.run_dir / "checkpoints").iterdir()) == ["stage-00-token", "stage-01-model"]
    done = json.loads((spec.run_dir / "DONE.json").read_text())
    assert done["config_hash"] == spec.config_hash() and done["outputs"] == ["learned_embeds.safetensors"]
    assert train_one(spec, progress=False).status == "skipped"
