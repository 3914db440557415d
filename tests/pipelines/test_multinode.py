"""A batch on a Ray cluster of two nodes (separate `ray start` process trees with their own temp folders and home
folders, storage and base model in SeaweedFS): its runs train on both nodes, and when the worker node is killed
mid-run (SIGKILL of its raylet) the run it held resumes on the head from its last stage checkpoint and finishes
with the weights an uninterrupted run has."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalize import storage
from pipelines.batch import main
from tests.conftest import draw_concept
from tests.pipelines.conftest import batch_file
from tests.pipelines.ray_nodes import LocalCluster, cluster_env

pytestmark = [pytest.mark.slow]

S3_SETTINGS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@pytest.fixture
def two_nodes(seaweedfs, local_ray, tmp_path):
    """A head and a worker node of 3 CPUs each (a run takes 2, so one run fits a node, and the batch keeps one CPU
    of the cluster for its actors); the test process is the driver. The session's local Ray is
    stopped for the test and started again after it."""
    import ray
    from ray._raylet import AuthenticationTokenLoader

    from pipelines.cluster import connect

    ray.shutdown()
    env = cluster_env({k: os.environ[k] for k in S3_SETTINGS})
    folder = Path(tempfile.mkdtemp(prefix="nodes-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    cluster = LocalCluster(folder, env)
    saved = dict(os.environ)
    try:
        cluster.start_head(cpus=3)
        cluster.add_worker("worker", cpus=3)
        os.environ.clear()
        os.environ.update({**env, "HOME": str(tmp_path / "driver-home"), "RAY_ADDRESS": cluster.address})
        AuthenticationTokenLoader.instance().reset_cache()  # this process read the local Ray's token before
        connect()
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        os.environ.clear()
        os.environ.update(saved)
        AuthenticationTokenLoader.instance().reset_cache()
        shutil.rmtree(folder, ignore_errors=True)
        connect(num_cpus=4)


def read_results(uri: str):
    import io

    import pandas as pd

    return pd.read_parquet(io.BytesIO(storage.read_bytes(f"{uri}/results/results.parquet")))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.5)


def test_a_batch_trains_on_both_nodes_and_outlives_a_killed_worker_node(two_nodes, tiny_model, tmp_path):
    import ray

    cluster = two_nodes
    head, worker = cluster.nodes
    storage.upload_dir(tiny_model, "s3://personalize/multinode/model", marker="model_index.json")
    concepts = []
    photos = draw_concept(tmp_path / "photos", n=3)
    for name in ("kiwi", "plum"):
        storage.upload_dir(photos, f"s3://personalize/multinode/concepts/{name}")
        concepts.append({"id": name, "images": f"s3://personalize/multinode/concepts/{name}", "super_category": "ball"})
    store = "s3://personalize/multinode/store"
    config = batch_file(tmp_path, "s3://personalize/multinode/model", (None, None), store, concepts,
                        methods=["rare_two_stage_lora"], evaluation=None,
                        method_overrides={"rare_two_stage_lora": {"stages.token.steps": 2, "stages.model.steps": 3}},
                        resources={"cpus_per_run": 2, "max_concurrent_runs": 2, "max_failures": 1})
    hangs = tmp_path / "hangs"
    hangs.mkdir()
    # every run waits at the second step of its model stage, after its token-stage checkpoint, until released
    os.environ["PERSONALIZE_INJECT_HANG"] = f"model:1:{hangs}"
    ray.shutdown()  # the driver joins again with the setting above in its runtime environment
    exit_code = {}
    batch = threading.Thread(target=lambda: exit_code.update(code=main([config])), daemon=True)
    batch.start()

    wait_for(lambda: len(list(hangs.glob("*.hang"))) == 2, 600, "both runs to reach their model stage")
    held = {marker.stem: cluster.node_of(int(marker.read_text())) for marker in hangs.glob("*.hang")}
    assert {node.name for node in held.values()} == {"head", "worker"}  # one run on each node
    moved = next(concept for concept, node in held.items() if node is worker)

    ended = worker.lose(int((hangs / f"{moved}.hang").read_text()))  # its raylet SIGKILLed, then what is left of it
    print(f"the lost node's Train worker {'ended with its raylet' if ended else 'outlived its raylet by 20 s'}")
    for concept in held:
        (hangs / f"{concept}.release").write_text("")
    batch.join(timeout=600)
    assert not batch.is_alive() and exit_code["code"] == 0

    frame = read_results(store).set_index("concept")
    assert list(frame["status"]) == ["finished", "finished"]
    head_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"])
    assert set(frame["node"]) == {head_id}  # both finished on the head, the moved run too
    local = tmp_path / "pulled"
    storage.download_prefix(f"{store}/runs/{moved}/rare_two_stage_lora", local / "moved")
    record = json.loads((local / "moved" / "node.json").read_text())
    assert record["stages"]["token"] != head_id and record["stages"]["model"] == head_id  # resumed, not retrained

    # both concepts are the same photos, so the run that stayed on the head is the moved run uninterrupted
    stayed = next(concept for concept in held if concept != moved)
    storage.download_prefix(f"{store}/runs/{stayed}/rare_two_stage_lora", local / "stayed")
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(local / "stayed" / name)), load_file(str(local / "moved" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    def files(folder, concept):
        return {p.relative_to(folder).as_posix().replace(concept, "<concept>") for p in folder.rglob("*") if p.is_file()}

    assert files(local / "stayed", stayed) == files(local / "moved", moved)
