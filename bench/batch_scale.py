"""A batch of many concepts x 2 methods, rehearsed: the rehearsal methods (pipelines/rehearsal.py) sleep a GPU's
step instead of training, so what is measured is the orchestration around the runs: the driver, Ray Data's
preparation of every concept, the scheduling of packs of runs, stage checkpoints, the results table and MLflow
tracking (a local MLflow server, whose access log counts the calls). The same batch at two sizes shows whether
anything grows faster than the number of runs.

    python bench/batch_scale.py                          # 50 and 1,000 concepts x 2 methods
    python bench/batch_scale.py --sizes 20 100 --step-seconds 0.01

The cluster is one Ray head with --cpus logical CPUs (64 slots by default); the concurrent runs are capped by
--concurrent, which a machine's memory bounds (each concurrent pack holds one Ray Train worker process).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import yaml

from personalize.models import build_tiny_model
from personalize.synthetic import SyntheticConcept, write_concepts
from pipelines.rehearsal import METHODS, STEP_VARIABLE, write_methods

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' cluster helper, from the repository root
from tests.pipelines.ray_nodes import LocalCluster, cluster_env, free_ports  # noqa: E402

API_CALL = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) /(api|ajax-api)/')
SHAPES = ("ellipse", "box", "triangle")


def many_concepts(folder: Path, count: int) -> Path:
    drawn = [SyntheticConcept(f"c{i:04d}", "toy", "object", (37 * i % 255, 90 + i % 120, 200 - i % 150),
                              (250, 250, 250), SHAPES[i % len(SHAPES)]) for i in range(count)]
    return write_concepts(folder, drawn, photos=2, size=64)


def mlflow_server(folder: Path) -> tuple[subprocess.Popen, str, Path]:
    port, = free_ports(1)
    log = folder / "mlflow.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while "Uvicorn running" not in log.read_text():
        if time.time() > deadline or server.poll() is not None:
            raise RuntimeError(f"the MLflow server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return server, uri, log


def api_calls(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if API_CALL.search(line))


def run_batch(folder: Path, model: Path, count: int, methods: list[Path], concurrent: int, env: dict,
              mlflow_log: Path, uri: str) -> dict:
    manifest = many_concepts(folder / f"concepts-{count}", count)
    config = folder / f"batch-{count}.yaml"
    config.write_text(yaml.safe_dump({
        "name": f"rehearsal-{count}", "model": str(model), "methods": [str(m) for m in methods],
        "concepts": str(manifest), "storage": str(folder / f"store-{count}"), "resolution": 64, "latent_variants": 1,
        "evaluation": None, "tracking": {"enabled": True, "uri": uri, "experiment": f"rehearsal-{count}", "register_models": False},
        "resources": {"cpus_per_run": 1, "max_concurrent_runs": concurrent}}))
    calls_before = api_calls(mlflow_log)
    began, peak = time.perf_counter(), 0
    with (folder / f"driver-{count}.log").open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "cluster.cli", "batch", str(config)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
        watched = psutil.Process(driver.pid)
        while driver.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
    seconds = time.perf_counter() - began
    if driver.returncode != 0:
        raise RuntimeError(f"the {count}-concept batch failed:\n{(folder / f'driver-{count}.log').read_text()[-4000:]}")
    results = pd.read_parquet(folder / f"store-{count}" / "results" / "results.parquet")
    runs = len(results)
    packs = sum(1 for p in (folder / f"store-{count}" / "ray").iterdir() if p.is_dir())
    return {"concepts": count, "runs": runs, "finished": int((results["status"] == "finished").sum()),
            "packs": packs, "seconds": round(seconds, 1), "s_per_run": round(seconds / runs, 3),
            "driver_peak_mb": round(peak / 1e6), "mlflow_calls_per_run": round((api_calls(mlflow_log) - calls_before) / runs, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 1000], help="concepts per batch (x 2 methods)")
    parser.add_argument("--step-seconds", type=float, default=0.02, help="seconds a rehearsal step sleeps")
    parser.add_argument("--cpus", type=int, default=64, help="logical CPUs of the rehearsal cluster's head")
    parser.add_argument("--concurrent", type=int, default=8, help="concurrent runs (packs) at most")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="rehearse-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    cluster = LocalCluster(folder / "nodes", cluster_env({}))
    server = None
    rows = []
    try:
        model = build_tiny_model(folder / "model")
        methods = write_methods(folder / "methods")
        server, uri, mlflow_log = mlflow_server(folder)
        cluster.start_head(cpus=args.cpus)
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "HOME": str(folder / "driver-home"),
               "PERSONALIZE_PLUGINS": "pipelines.rehearsal", STEP_VARIABLE: str(args.step_seconds)}
        for count in args.sizes:
            rows.append(run_batch(folder, model, count, methods, args.concurrent, env, mlflow_log, uri))
            print(rows[-1], flush=True)
    finally:
        cluster.stop()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    table = pd.DataFrame(rows)
    steps = sum(s for stages in METHODS.values() for _, s in stages)
    sleep = steps * args.step_seconds / len(METHODS)
    print(f"\nrehearsal batches ({len(METHODS)} methods, {sleep:.2f} s of simulated steps a run on average), a Ray head "
          f"of {args.cpus} logical CPUs, at most {args.concurrent} concurrent runs, MLflow server on loopback:")
    print(table.to_string(index=False))
    if len(table) > 1:
        first, last = table.iloc[0], table.iloc[-1]
        print(f"\n{last['runs'] / first['runs']:.0f}x the runs: {last['seconds'] / first['seconds']:.1f}x the time "
              f"({last['s_per_run'] / first['s_per_run']:.2f}x a run), {last['driver_peak_mb'] / first['driver_peak_mb']:.2f}x "
              f"the driver's peak memory, {last['mlflow_calls_per_run'] / first['mlflow_calls_per_run']:.2f}x the MLflow calls a run")


if __name__ == "__main__":
    main()
