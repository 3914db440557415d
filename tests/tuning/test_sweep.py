"""Sweeps with Ray Tune on the tiny model: ASHA stops trials at stage boundaries, the best configuration
runs, MLflow has one child per trial, Optuna's two-objective Pareto set is right, an interrupted sweep resumes
without redoing finished trials and a hanging trial is failed instead of
waited on while the other trial (after the session's other sweeps on the same Ray) finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import draw_concept
from tests.pipelines.conftest import batch_file
from tuning.sweep import main as sweep_main
from tuning.sweep import pareto

pytestmark = [pytest.mark.slow]


def read_table(path: Path) -> pd.DataFrame:
    """A sweep's CSV table; trial ids stay strings (an id of digits only would otherwise be read as a number)."""
    return pd.read_csv(path, dtype={"trial_id": str})


def sweep_file(folder: Path, batch: str, **extra) -> str:
    config = {"name": "tiny-sweep", "batch": batch, "space": {"stages.token.steps": {"grid": [1, 2]}, "stages.model.lr": {"grid": [1e-5, 1e-3]}},
              "search": {"algorithm": "grid", "samples": 1, "max_concurrent": 2},
              "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
              "objective": {"weights": {"clip_t": 1.0, "dino": 1.0}}, "stage_eval_prompts": 2,
              "budget": {"time_budget_s": 1500, "trial_timeout_s": 600}}
    config.update(extra)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def base_batch(folder: Path, tiny_model, scorers, tracking=None, **extra) -> str:
    concept = [{"id": "ball", "images": str(draw_concept(folder / "ball", n=3)), "super_category": "ball"}]
    return batch_file(folder, tiny_model, scorers, folder / "store", concept, methods=["rare_two_stage_lora"],
                      evaluation={"prompts": "personalize_eval", "samples": 1, "steps": 1, "clip": str(scorers[0]), "dino": str(scorers[1])},
                      tracking=tracking or {"enabled": False},
                      method_overrides={"rare_two_stage_lora": {"stages.token.steps": 2, "stages.model.steps": 2}}, **extra)


def test_asha_sweep_stops_trials_on_validation_and_exports_a_runnable_best_config(local_ray, tiny_model, tiny_scorers, tmp_path):
    """Validation every step: a trial of t token steps reports at each of its t + 2 steps, at both stage ends and with
    its final evaluation (t + 5 reports); ASHA's rungs at 1, 2 and 4 reports fall mostly on validation points."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    batch = base_batch(tmp_path, tiny_model, tiny_scorers, {"enabled": True, "uri": uri, "experiment": "sweeps"},
                       validation={"every": 1, "prompt_count": 1, "steps": 1})
    assert sweep_main([sweep_file(tmp_path, batch)]) == 0
    out = tmp_path / "store" / "sweeps" / "tiny-sweep"
    trials = read_table(out / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) <= {"finished", "stopped"}
    stopped = trials[trials["status"] == "stopped"]
    total = trials["overrides"].map(lambda o: json.loads(o)["stages.token.steps"]) + 5
    assert len(stopped) >= 1 and (stopped["reports"] < total[stopped.index]).all() and "validation" in set(stopped["phase"])
    finished = trials[trials["status"] == "finished"]
    assert (finished["reports"] == total[finished.index]).all()
    for trial_id in stopped["trial_id"]:  # stopped trials leave no checkpoints behind
        assert not (tmp_path / "store" / "trials" / trial_id / "runs").exists()
    assert (out / "pareto.png").stat().st_size > 5000
    best = yaml.safe_load((out / "best_experiment.yaml").read_text())
    assert set(best["overrides"]) >= {"stages.token.steps", "stages.model.lr"}
    best_path = tmp_path / "best.yaml"
    best["output_dir"] = str(tmp_path / "best-runs")
    best_path.write_text(yaml.safe_dump(best))
    from personalize.cli import main as cli

    assert cli(["train", str(best_path)]) == 0
    assert (tmp_path / "best-runs" / "ball" / "rare_two_stage_lora" / "DONE.json").is_file()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    parent = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 4
    assert client.list_artifacts(parent[0].info.run_id, "logs")  # Ray's worker logs of the sweep, by node
    assert list((tmp_path / "store" / "logs").glob("*/*/worker-*"))
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(trials["trial_id"])
    assert {r.data.tags["trial_status"] for r in children} == set(trials["status"])
    for child in children:  # the validation curve, over steps, and each point's sample grid
        curve = client.get_metric_history(child.info.run_id, "val/objective")
        assert curve and {m.step for m in curve} <= {1, 2, 3, 4} and 1 in {m.step for m in curve}
        assert "validation/step-000001.png" in [a.path for a in client.list_artifacts(child.info.run_id, "validation")]


def test_optuna_pareto_and_resume_of_an_interrupted_sweep(local_ray, tiny_model, tiny_scorers, tmp_path):
    batch = base_batch(tmp_path, tiny_model, tiny_scorers)
    config = sweep_file(tmp_path, batch, name="pareto-sweep", space={"stages.model.lr": {"loguniform": [1e-6, 1e-2]}},
                        search={"algorithm": "optuna", "samples": 2, "max_concurrent": 1, "seed": 3},
                        scheduler={"type": "none"}, objective={"metrics": ["clip_t", "dino"]})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "tuning.sweep", config], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    trials_dir = tmp_path / "store" / "trials"
    deadline = time.time() + 600
    while time.time() < deadline and not list(trials_dir.glob("*/runs/ball/rare_two_stage_lora/eval/*/metrics.json")):
        time.sleep(2)
    # the trials evaluated in full (a later trial may have written DONE.json and be cut short in its evaluation)
    first = [m.parents[2] / "DONE.json" for m in trials_dir.glob("*/runs/ball/rare_two_stage_lora/eval/*/metrics.json")]
    assert first, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGINT)  # interrupt the sweep after its first finished trial
    proc.wait(timeout=180)
    stamp = {p: p.stat().st_mtime_ns for p in first}
    assert sweep_main([config]) == 0  # resubmitted: restored, the remaining trials run
    assert {p: p.stat().st_mtime_ns for p in first} == stamp  # the finished trial was not rerun
    out = tmp_path / "store" / "sweeps" / "pareto-sweep"
    trials = read_table(out / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "finished").all()
    front = read_table(out / "pareto.csv")
    assert len(front) >= 1
    points = trials[["clip_t", "dino"]].to_numpy()
    on_front = set(front["trial_id"])
    for row, point in zip(trials.itertuples(), points):
        dominated = any((o >= point).all() and (o > point).any() for o in points)
        assert dominated == (row.trial_id not in on_front)
    assert len(pareto(trials)) == len(front)


def test_a_hanging_trial_is_failed_not_waited_on(local_ray, tiny_model, tiny_scorers, tmp_path, monkeypatch):
    """The trial of 3 model steps hangs at its third, after its first report; its silence outlasts report_timeout_s
    and it is failed, while the other trial (after the session's other sweeps on the same Ray) finishes."""
    monkeypatch.setenv("PERSONALIZE_INJECT_HANG", "model:2")
    batch = base_batch(tmp_path, tiny_model, tiny_scorers)
    config = sweep_file(tmp_path, batch, name="hang-sweep", space={"stages.model.steps": {"grid": [2, 3]}},
                        scheduler={"type": "none"}, budget={"trial_timeout_s": 600, "report_timeout_s": 45})
    began = time.time()
    assert sweep_main([config]) == 0  # the trial without the hang still finishes
    assert time.time() - began < 400
    trials = read_table(tmp_path / "store" / "sweeps" / "hang-sweep" / "trials.csv")
    by_steps = trials.set_index(trials["overrides"].map(lambda o: json.loads(o)["stages.model.steps"]))
    assert by_steps["status"].to_dict() == {2: "finished", 3: "timed out"}
    assert by_steps.loc[3, "reports"] >= 1 and "reported nothing for 45 s" in by_steps.loc[3, "error"]
