"""A hundred runs through the real driver: 50 concepts x the 2 rehearsal methods (pipelines/rehearsal.py: no
model is trained, each step sleeps), through Ray Data's preparation, packs of runs on Ray Train, the results table
and MLflow tracking. Four packs of 25 runs, one wave: what a pack costs to start (a Train controller and worker, about
20 s on 2 cores) is paid four times, not fifteen as with the default packs of up to 8 (tests/unit/test_packs.py
pins those). bench/batch_scale.py runs the same at 1,000 concepts."""

import json

import mlflow
import pandas as pd

from personalize.synthetic import SyntheticConcept, write_concepts
from pipelines.batch import main
from pipelines.rehearsal import METHODS, STEP_VARIABLE, write_methods
from tests.pipelines.conftest import batch_file

CONCEPTS = 50
CONCURRENT = 4
PACK = 25


def test_a_hundred_rehearsed_runs_are_trained_tracked_and_tabled(local_ray, tiny_model, tiny_scorers, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_PLUGINS", "pipelines.rehearsal")
    monkeypatch.setenv(STEP_VARIABLE, "0.005")
    drawn = [SyntheticConcept(f"c{i:02d}", "toy", "object", (5 * i, 120, 200 - 3 * i), (250, 250, 250), "ellipse")
             for i in range(CONCEPTS)]
    manifest = write_concepts(tmp_path / "concepts", drawn, photos=2, size=64)
    methods = write_methods(tmp_path / "methods")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = batch_file(tmp_path, tiny_model, tiny_scorers, tmp_path / "store", str(manifest),
                        methods=[str(m) for m in methods], method_overrides={}, evaluation=None,
                        tracking={"enabled": True, "uri": uri, "experiment": "rehearsal", "register_models": False},
                        resources={"max_concurrent_runs": CONCURRENT, "runs_per_trainer": PACK})
    assert main([config]) == 0

    frame = pd.read_parquet(tmp_path / "store" / "results" / "results.parquet")
    runs = CONCEPTS * len(METHODS)
    assert len(frame) == runs and set(frame["status"]) == {"finished"} and frame["node"].str.len().gt(0).all()
    assert sorted(set(frame["method"])) == sorted(METHODS)
    ray_runs = [p for p in (tmp_path / "store" / "ray").iterdir() if p.is_dir()]
    assert len(ray_runs) == runs // PACK == 4  # one Ray Train run a pack

    for row in frame.itertuples():
        stages = METHODS[row.method]
        done = json.loads((tmp_path / "store" / "runs" / row.concept / row.method / "DONE.json").read_text())
        # the step setting reached every Ray worker
        assert done["rehearsal_step_seconds"] == 0.005 and set(done["stages"]) == {name for name, _ in stages}
        assert set(json.loads(row.stage_seconds)) == {name for name, _ in stages}

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("rehearsal")
    children = client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''", max_results=1000)
    assert len(children) == runs and {r.info.status for r in children} == {"FINISHED"}
    two_stage = next(r for r in children if r.data.tags["method"] == "rehearsal_two_stage")
    assert two_stage.data.params["method.stages.model.steps"] == "20"
    history = client.get_metric_history(two_stage.info.run_id, "train/model/loss")
    assert [m.step for m in history] == list(range(10, 30))  # the second stage's steps follow the first's
    assert {"stage_seconds/token", "stage_seconds/model"} <= set(two_stage.data.metrics)
