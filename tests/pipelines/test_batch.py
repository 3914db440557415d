"""The batch on a local Ray, tracked in a local MLflow store: good runs finish with artifacts and metrics, bad
concepts are reported with their reason, the MLflow layout reads back as documented, secrets never leak, a
resubmission trains nothing again, and a fault mid-run resumes from the last stage checkpoint."""

import base64
import io
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.batch import main
from pipelines.redaction import redact
from pipelines.tracking import BATCH_KEY, RUN_KEY, flatten
from tests.conftest import draw_concept
from tests.pipelines.conftest import batch_file
from tests.pipelines.ray_nodes import LocalCluster, cluster_env

FAKE_SECRET = "fake-secret-Zq81KkP0"


@pytest.fixture(scope="module")
def tracked(local_ray, tiny_model, tiny_scorers, tmp_path_factory):
    """One tracked batch: 3 concepts (one with a truncated image, one empty, its path holding a secret) x 2 methods."""
    root = tmp_path_factory.mktemp("batch")
    good = draw_concept(root / "ball", n=3)
    broken = draw_concept(root / "broken", n=2)
    (broken / "0.png").write_bytes((broken / "0.png").read_bytes()[:150])
    (root / FAKE_SECRET / "empty").mkdir(parents=True)
    twin_a, twin_b = draw_concept(root / "twin-a", n=2), draw_concept(root / "twin-b", n=2)
    concepts = [{"id": "ball", "images": str(good), "super_category": "ball"},
                {"id": "broken", "images": str(broken), "super_category": "ball"},
                {"id": "empty", "images": str(root / FAKE_SECRET / "empty"), "super_category": "box"},
                # bad manifest rows fail only their concept
                {"id": "../escape", "images": str(good), "super_category": "ball"},
                {"id": "odd", "images": str(good), "super_category": "ball", "kind": "plant"},
                {"id": "twin", "images": str(twin_a), "super_category": "ball"},
                {"id": "twin", "images": str(twin_b), "super_category": "ball"}]
    manifest = root / "concepts.yaml"
    manifest.write_text(yaml.safe_dump({"concepts": concepts}))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = batch_file(root, tiny_model, tiny_scorers, root / "store", str(manifest),
                        samples={"steps": 1, "seeds": [0], "heatmaps": True},
                        tracking={"enabled": True, "uri": uri, "experiment": "tracked", "best_metric": "eval/clip_i"})
    import os

    saved = os.environ.get("AWS_SECRET_ACCESS_KEY")
    os.environ["AWS_SECRET_ACCESS_KEY"] = FAKE_SECRET
    try:
        code = main([config])
    finally:
        if saved is None:
            os.environ.pop("AWS_SECRET_ACCESS_KEY")
        else:
            os.environ["AWS_SECRET_ACCESS_KEY"] = saved
    return {"root": root, "store": root / "store", "uri": uri, "config": config, "code": code, "images": good}


def test_good_runs_finish_and_bad_concepts_are_reported(tracked):
    assert tracked["code"] == 0
    frame = pd.read_parquet(tracked["store"] / "results" / "results.parquet")
    assert len(frame) == 12  # 6 concepts (3 of them bad manifest rows) x 2 methods
    good = frame[frame["concept"] == "ball"]
    assert list(good["status"]) == ["finished", "finished"]
    assert good[["clip_t", "clip_i", "dino"]].notna().all().all()
    assert good["node"].str.fullmatch("[0-9a-f]{56}").all()  # the Ray node that finished each run
    for run in good["run_dir"]:
        assert {"DONE.json", "learned_embeds.safetensors", "losses.csv", "samples.png"} <= {p.name for p in Path(run).iterdir()}
        assert json.loads(good[good["run_dir"] == run]["stage_seconds"].iloc[0])
    bad = frame[frame["concept"] != "ball"].set_index("concept")
    assert (bad["status"] == "failed").all()
    assert "concept 'broken': 0.png cannot be read" in bad.loc["broken", "reason"].iloc[0]
    assert "concept 'empty'" in bad.loc["empty", "reason"].iloc[0] and "is empty" in bad.loc["empty", "reason"].iloc[0]
    assert "concept id '../escape' is unsafe" in bad.loc["../escape", "reason"].iloc[0]
    assert "kind: got 'plant'" in bad.loc["odd", "reason"].iloc[0]
    twin = bad.loc["twin", "reason"].iloc[0]
    assert "appears more than once" in twin and "twin-a" in twin and "twin-b" in twin
    markdown = (tracked["store"] / "results" / "results.md").read_text()
    assert "| ball | textual_inversion | finished |" in markdown and "| broken | rare_two_stage_lora | failed |" in markdown
    assert (tracked["store"] / "results" / "comparison" / "scatter.png").is_file()


def test_mlflow_layout(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracked["uri"])
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if BATCH_KEY in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 6  # one per (concept, method), the failed ones included
    by_key = {(r.data.tags["concept"], r.data.tags["method"]): r for r in children}
    ti = by_key[("ball", "textual_inversion")]
    assert ti.info.status == "FINISHED"
    assert {"method", "concept", "model", "code_version", "config_hash", RUN_KEY} <= set(ti.data.tags)
    assert ti.data.params["method.stages.embedding.steps"] == "3" and ti.data.params["resolution"] == "64"
    assert {"train/embedding/diffusion", "train/embedding/loss", "stage_seconds/embedding", "eval/clip_t", "eval/clip_i",
            "eval/dino"} <= set(ti.data.metrics)
    assert [m.step for m in client.get_metric_history(ti.info.run_id, "train/embedding/loss")] == [0, 1, 2]
    artifacts = {a.path for folder in ("learned", "evaluation", "attention", "config", "samples")
                 for a in client.list_artifacts(ti.info.run_id, folder)}
    assert {"learned/learned_embeds.safetensors", "evaluation/scores.csv", "config/config.resolved.json",
            "attention/stage-00-embedding.png", "samples/samples.png"} <= artifacts
    rare = by_key[("ball", "rare_two_stage_lora")]
    assert {"learned/pytorch_lora_weights.safetensors", "learned/learned_embeds.safetensors"} <= \
        {a.path for a in client.list_artifacts(rare.info.run_id, "learned")}  # (rare)'s identity stage as LoRA
    failed = by_key[("empty", "textual_inversion")]
    assert failed.info.status == "FAILED" and "concept 'empty'" in failed.data.tags["failure_reason"]
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "results")} >= {"results/results.md", "results/results.parquet"}


def test_models_are_registered_with_the_best_run_aliased_and_generate(tracked):
    import mlflow
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(tracked["uri"])
    versions = client.search_model_versions("name = 'tracked.ball'")
    assert len(versions) == 2
    runs = {v.run_id: client.get_run(v.run_id) for v in versions}
    best = max(runs.values(), key=lambda r: r.data.metrics["eval/clip_i"])
    assert client.get_model_version_by_alias("tracked.ball", "champion").run_id == best.info.run_id
    mlflow.set_tracking_uri(tracked["uri"])
    model = mlflow.pyfunc.load_model("models:/tracked.ball@champion")
    stated = model.metadata.get_input_schema().input_names(), model.metadata.get_params_schema().to_dict()
    assert stated[0] == ["prompt", "seed"] and {p["name"] for p in stated[1]} == {"steps", "guidance_scale"}
    out = model.predict(pd.DataFrame({"prompt": ["a {} on the beach"], "seed": [3]}), params={"steps": 2})
    assert out["prompt"][0].endswith("on the beach") and "{}" not in out["prompt"][0]
    assert Image.open(io.BytesIO(base64.b64decode(out["image_png"][0]))).size == (64, 64)
    lora = next(v for v in versions if runs[v.run_id].data.tags["method"] == "rare_two_stage_lora")
    lora_model = mlflow.pyfunc.load_model(f"models:/tracked.ball/{lora.version}")  # LoRA adapters through diffusers' loader
    lora_out = lora_model.predict(pd.DataFrame({"prompt": ["a {} on the beach"], "seed": [3]}), params={"steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(lora_out["image_png"][0]))).size == (64, 64)


def test_the_jobs_ray_worker_logs_are_kept_under_the_storage_root_and_in_mlflow(tracked):
    from mlflow.tracking import MlflowClient

    folders = sorted((tracked["store"] / "logs").iterdir())  # a later test's resubmission adds its own
    assert "-job" in folders[0].name
    files = sorted(folders[0].rglob("worker-*"))
    texts = [f.read_text() for f in files]
    assert files and all(":job_id:" in text for text in texts)
    assert any(":actor_name:RayTrainWorker" in text for text in texts)  # the training workers' logs among them
    assert {f.suffix for f in files} == {".out", ".err"}
    assert FAKE_SECRET not in "".join(texts)
    client = MlflowClient(tracked["uri"])
    parent = [r for r in client.search_runs([client.get_experiment_by_name("tracked").experiment_id]) if BATCH_KEY in r.data.tags][0]
    logged = {a.path for node in client.list_artifacts(parent.info.run_id, "logs") for a in client.list_artifacts(parent.info.run_id, node.path)}
    assert {f"logs/{f.parent.name}/{f.name}" for f in files} == logged


def test_the_drivers_node_logs_are_read_from_disk_as_the_state_api_serves_them(tracked):
    """On the driver's node the files are read where Ray writes them (the state API of a second local Ray on the
    same machine cannot serve them); they are the same files and lines the state API gives, which asks the
    connected cluster even with another Ray running on the machine."""
    from pipelines.ray_logs import FolderLogs, StateApiLogs, node_readers

    [(node_id, _, folder)] = [r for r in node_readers() if isinstance(r[2], FolderLogs)]
    api = StateApiLogs(node_id)
    kept = sorted((tracked["store"] / "logs").iterdir())[0]
    finished = sorted(f.name for f in kept.rglob("worker-*"))  # the tracked batch's workers: ended, files complete
    other = LocalCluster(Path(tempfile.mkdtemp(prefix="other-", dir="/tmp")), cluster_env({}))  # short socket paths
    other.start_head(cpus=0)
    try:
        assert finished and set(finished) <= folder.names() and set(finished) <= api.names()
        for name in finished[:4]:
            assert folder.read(name, 50) == api.read(name, 50)
    finally:
        other.stop()
        shutil.rmtree(other.folder, ignore_errors=True)


def test_secrets_never_reach_mlflow_or_the_results(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracked["uri"])
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    everything = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert FAKE_SECRET not in everything and "***" in everything
    assert FAKE_SECRET not in (tracked["store"] / "results" / "results.md").read_text()
    assert FAKE_SECRET not in pd.read_parquet(tracked["store"] / "results" / "results.parquet").to_csv()


def test_flatten_and_redact(monkeypatch):
    flat = flatten({"method": {"stages": [{"name": "identity", "steps": 200}]}, "aws_secret_key": "abc", "a": [1, 2]})
    assert flat == {"method.stages.identity.name": "identity", "method.stages.identity.steps": "200",
                    "aws_secret_key": "***", "a": "[1, 2]"}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    assert redact(f"path /x/{FAKE_SECRET}/y and s3://user:pass@host/b") == "path /x/***/y and s3://***@host/b"


def test_resubmitting_trains_nothing_again(tracked):
    frame = pd.read_parquet(tracked["store"] / "results" / "results.parquet")
    runs = list(frame[frame["concept"] == "ball"]["run_dir"])
    before = {r: ((Path(r) / "losses.csv").read_text(), (Path(r) / "losses.csv").stat().st_mtime_ns) for r in runs}
    logs_before = {p: p.read_text() for p in (tracked["store"] / "logs").rglob("*") if p.is_file()}
    assert main([tracked["config"]]) == 0
    assert {p: p.read_text() for p in logs_before} == logs_before  # the first submission's logs stay as they were
    again = pd.read_parquet(tracked["store"] / "results" / "results.parquet")
    assert list(again[again["concept"] == "ball"]["status"]) == ["skipped", "skipped"]
    assert {r: ((Path(r) / "losses.csv").read_text(), (Path(r) / "losses.csv").stat().st_mtime_ns) for r in runs} == before
    assert again[again["concept"] == "ball"][["clip_t", "dino"]].notna().all().all()  # the evaluation reused


def test_a_fault_mid_run_resumes_from_the_last_stage_checkpoint(tracked, tiny_model, tiny_scorers, tmp_path, monkeypatch):
    """The same batch again in new storage, with a fault in the second stage: the same weights as the clean run."""
    concept = [{"id": "ball", "images": str(tracked["images"]), "super_category": "ball"}]
    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"model:1:{tmp_path / 'fault-marker'}")
    faulty = batch_file(tmp_path, tiny_model, tiny_scorers, tmp_path / "store", concept, methods=["rare_two_stage_lora"],
                        method_overrides={"rare_two_stage_lora": {"stages.token.steps": 2, "stages.model.steps": 2}}, evaluation=None, samples={"steps": 1, "seeds": [0], "heatmaps": True})
    assert main([faulty]) == 0
    assert (tmp_path / "fault-marker").is_file()  # the fault happened, in the second stage
    clean = tracked["store"] / "runs" / "ball" / "rare_two_stage_lora"
    resumed = tmp_path / "store" / "runs" / "ball" / "rare_two_stage_lora"
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):  # a LoRA run, resumed on Ray
        a, b = load_file(str(clean / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ray_runs = list((tmp_path / "store" / "ray").iterdir())
    assert any((r / "ball--rare_two_stage_lora--stage-00-token").is_dir() for r in ray_runs)  # the stage checkpoint Ray kept and restored
    assert set(json.loads((resumed / "DONE.json").read_text())["stages"]) == {"token", "model"}


def test_every_run_failing_is_a_non_zero_exit(local_ray, tiny_model, tiny_scorers, tmp_path):
    (tmp_path / "empty").mkdir()
    config = batch_file(tmp_path, tiny_model, tiny_scorers, tmp_path / "store",
                        [{"id": "empty", "images": str(tmp_path / "empty"), "super_category": "box"}])
    assert main([config]) == 1
    assert main([config, "resources.gpus_per_run=-1"]) == 2  # an invalid config


def test_a_failed_evaluation_is_reported_and_keeps_the_trained_runs(tracked, tmp_path, capsys):
    missing = tmp_path / "no-clip-here"
    missing.mkdir()  # a folder (a missing one is refused before anything starts) that holds no CLIP model
    runs = tracked["store"] / "runs" / "ball"
    done = {m: (runs / m / "DONE.json").read_text() for m in ("textual_inversion", "rare_two_stage_lora")}
    assert main([tracked["config"], f"evaluation.clip={missing}", "tracking.enabled=false"]) == 0  # runs stand
    assert "evaluation failed: " in capsys.readouterr().out
    frame = pd.read_parquet(tracked["store"] / "results" / "results.parquet")
    ball = frame[frame["concept"] == "ball"]
    assert list(ball["status"]) == ["skipped", "skipped"]  # trained before: kept, not retrained
    assert all(r.startswith("not evaluated:") and str(missing) in r for r in ball["reason"]), list(ball["reason"])
    assert {m: (runs / m / "DONE.json").read_text() for m in done} == done


def test_a_run_folder_of_another_configuration_fails_that_run_and_is_kept(tracked):
    """Resubmitting with settings that change the learned result, into the same storage: nothing is trained over
    the finished runs, each is reported failed with the reason, and their folders stay as they were."""
    runs = tracked["store"] / "runs" / "ball"
    done = {m: (runs / m / "DONE.json").read_text() for m in ("textual_inversion", "rare_two_stage_lora")}
    assert main([tracked["config"], "latent_variants=2", "tracking.enabled=false"]) == 1  # every run failed
    frame = pd.read_parquet(tracked["store"] / "results" / "results.parquet")
    ball = frame[frame["concept"] == "ball"]
    assert list(ball["status"]) == ["failed", "failed"]
    assert all("holds a run of a different configuration" in r for r in ball["reason"]), list(ball["reason"])
    assert {m: (runs / m / "DONE.json").read_text() for m in done} == done


def test_a_pack_trains_its_runs_in_one_train_run_and_a_crash_fails_only_its_run(local_ray, tiny_model, tiny_scorers,
                                                                                tmp_path, monkeypatch):
    """Three runs packed into one Train run; the middle one crashes every time. The first is finished once and
    kept, the crashing one fails with its error after its restarts, the third (never reached by the pack) is
    queued again on its own and finishes."""
    concepts = [{"id": name, "images": str(draw_concept(tmp_path / name, n=2)), "super_category": "ball"}
                for name in ("first", "crashing", "third")]
    monkeypatch.setenv("PERSONALIZE_INJECT_CRASH", "crashing:embedding:1")
    config = batch_file(tmp_path, tiny_model, tiny_scorers, tmp_path / "store", concepts, methods=["textual_inversion"],
                        method_overrides={"textual_inversion": {"stages.embedding.steps": 3, "stages.embedding.batch_size": 1}},
                        evaluation=None, resources={"max_concurrent_runs": 1, "runs_per_trainer": 3, "max_failures": 1})
    assert main([config]) == 0
    frame = pd.read_parquet(tmp_path / "store" / "results" / "results.parquet").set_index("concept")
    assert dict(frame["status"]) == {"first": "finished", "crashing": "failed", "third": "finished"}
    assert "injected crash of crashing at embedding step 1" in frame.loc["crashing", "reason"]
    runs = tmp_path / "store" / "runs"
    losses = pd.read_csv(runs / "first" / "textual_inversion" / "losses.csv")
    assert list(losses[losses["metric"] == "train/embedding/loss"]["step"]) == [0, 1, 2]  # trained once: the pack's restart skipped the finished run
    record = json.loads((runs / "first" / "textual_inversion" / "node.json").read_text())
    assert record["seconds"] > 0 and frame.loc["first", "train_seconds"] == pytest.approx(record["seconds"], abs=0.01)
    ray_runs = sorted(p.name for p in (tmp_path / "store" / "ray").iterdir() if p.is_dir())
    assert any(name.startswith("first--textual_inversion--and-2-more--") for name in ray_runs), ray_runs
    assert any(name.startswith("crashing--textual_inversion--") and "more" not in name for name in ray_runs), ray_runs
    assert any(name.startswith("third--textual_inversion--") for name in ray_runs), ray_runs

    import ray
    from ray.util.state import list_actors

    # what a run does not use is not started: no Ray Data shard manager, no preemption watcher on a local Ray
    actors = {a.class_name for a in list_actors(address=ray.get_runtime_context().gcs_address, limit=10000, detail=False)}
    assert "TrainController" in actors and not actors & {"DatasetManager", "PreemptionWatcher"}, actors


def test_a_run_on_two_workers_trains_data_parallel(local_ray, tiny_model, tmp_path):
    """Several workers a run get the torch backend's process group: both ranks train, gradients are averaged
    (personalize/distributed.py), rank 0 writes the run."""
    from personalize.config import resolve_runs
    from personalize.run_settings import ExperimentConfig
    from pipelines.train import train_runs

    spec, = resolve_runs(ExperimentConfig.model_validate({
        "model": str(tiny_model), "method": "textual_inversion", "output_dir": str(tmp_path / "store" / "runs"),
        "resolution": 64, "latent_variants": 1, "samples": {"steps": 1, "seeds": [0], "heatmaps": False},
        "overrides": {"stages.embedding.steps": 2, "stages.embedding.batch_size": 1},
        "concepts": [{"id": "ball", "images": str(draw_concept(tmp_path / "ball", n=2)), "super_category": "ball"}]}))
    scaling = {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}}
    outcome, = train_runs([spec], scaling, str(tmp_path / "store"), concurrency=1, max_failures=0, env={})
    assert outcome.status == "finished", outcome.reason
    assert json.loads((spec.run_dir / "node.json").read_text())["workers"] == 2  # the process group both ranks joined
    assert (spec.run_dir / "learned_embeds.safetensors").is_file()
