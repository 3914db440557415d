"""The MLflow layout of a tracked batch, read back through the MLflow client; secrets never reach it."""

import io
import json

import pandas as pd
import pytest

from pipelines.batch import main
from pipelines.tracking import BATCH_KEY, RUN_KEY, flatten
from pipelines.redaction import redact
from tests.conftest import draw_concept
from tests.pipelines.conftest import batch_file

FAKE_SECRET = "fake-secret-Zq81KkP0"


def test_flatten_names_stages_and_masks_secret_keys():
    flat = flatten({"method": {"stages": [{"name": "identity", "steps": 200}]}, "aws_secret_key": "abc", "a": [1, 2]})
    assert flat == {"method.stages.identity.name": "identity", "method.stages.identity.steps": "200",
                    "aws_secret_key": "***", "a": "[1, 2]"}


def test_redaction(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    assert redact(f"path /x/{FAKE_SECRET}/y and s3://user:pass@host/b") == "path /x/***/y and s3://***@host/b"


def test_tracked_batch_layout_models_aliases_and_no_secrets(local_ray, tiny_model, tiny_scorers, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    good = {"id": "ball", "images": str(draw_concept(tmp_path / "ball", n=3)), "super_category": "ball"}
    (tmp_path / FAKE_SECRET / "empty").mkdir(parents=True)  # a path holding a secret, in an error message
    bad = {"id": "empty", "images": str(tmp_path / FAKE_SECRET / "empty"), "super_category": "box"}
    config = batch_file(tmp_path, tiny_model, tiny_scorers, tmp_path / "store", [good, bad],
                        samples={"steps": 1, "seeds": [0], "heatmaps": True},
                        tracking={"enabled": True, "uri": uri, "experiment": "tracked", "best_metric": "eval/clip_i"})
    assert main([config]) == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if BATCH_KEY in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4  # one per (concept, method), the failed ones included
    by_key = {(r.data.tags["concept"], r.data.tags["method"]): r for r in children}
    ti = by_key[("ball", "textual_inversion")]
    assert ti.info.status == "FINISHED"
    assert {"method", "concept", "model", "code_version", "config_hash", RUN_KEY} <= set(ti.data.tags)
    assert ti.data.params["method.stages.embedding.steps"] == "3" and ti.data.params["resolution"] == "64"
    assert {"train/embedding/diffusion", "train/embedding/loss", "stage_seconds/embedding", "eval/clip_t", "eval/clip_i",
            "eval/dino"} <= set(ti.data.metrics)
    history = client.get_metric_history(ti.info.run_id, "train/embedding/loss")
    assert [m.step for m in history] == [0, 1, 2]
    artifacts = {a.path for folder in ("learned", "evaluation", "attention", "config") for a in client.list_artifacts(ti.info.run_id, folder)}
    assert {"learned/learned_embeds.safetensors", "evaluation/scores.csv", "config/config.resolved.json",
            "attention/stage-00-embedding.png"} <= artifacts
    rare = by_key[("ball", "rare_two_stage")]
    assert "learned/unet.safetensors" in {a.path for a in client.list_artifacts(rare.info.run_id, "learned")}
    failed = by_key[("empty", "textual_inversion")]
    assert failed.info.status == "FAILED" and "concept 'empty'" in failed.data.tags["failure_reason"]

    model = client.get_registered_model("tracked.ball")
    versions = client.search_model_versions("name = 'tracked.ball'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("tracked.ball", "champion")
    scores = {r.data.tags["method"]: r.data.metrics["eval/clip_i"] for r in (ti, rare)}
    best = max(scores, key=scores.get)
    assert champion.run_id == by_key[("ball", best)].info.run_id and model.name == "tracked.ball"

    everything = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert FAKE_SECRET not in everything and "***" in everything
    assert FAKE_SECRET not in (tmp_path / "store" / "results" / "results.md").read_text()
    assert FAKE_SECRET not in pd.read_parquet(tmp_path / "store" / "results" / "results.parquet").to_csv()
    out = capsys.readouterr()
    assert FAKE_SECRET not in out.out + out.err


def test_the_registered_model_generates_from_a_prompt(local_ray, tiny_model, tiny_scorers, tmp_path):
    import base64

    import mlflow
    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = batch_file(tmp_path, tiny_model, tiny_scorers, tmp_path / "store", methods=["textual_inversion"],
                        evaluation=None, tracking={"enabled": True, "uri": uri, "experiment": "reg"})
    assert main([config]) == 0
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/reg.ball/1")
    out = model.predict(pd.DataFrame({"prompt": ["a {} on the beach"], "seed": [3]}), params={"steps": 2})
    assert out["prompt"][0] == "a <ball> on the beach"
    image = Image.open(io.BytesIO(base64.b64decode(out["image_png"][0])))
    assert image.size == (64, 64)
