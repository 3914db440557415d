"""Concepts per hour against concurrent runs on a two-node Ray cluster: a head and a worker node started as
separate `ray start` processes on this machine (each with its own folders, as in tests/pipelines/test_multinode.py),
and the same batch submitted at 1, 2 and 4 concurrent runs, each from empty storage. The ratio against 1 concurrent
run is the scaling; the runs' node column shows how they spread.

    python bench/node_scaling.py                        # 8 concepts x Textual Inversion, tiny model, CPU
    python bench/node_scaling.py --concepts 16 --steps 100 --levels 1 2 4 8

On a 2-core machine the nodes share two cores, so scaling stops at about 2; on a cluster of GPU nodes each
concurrent run has its own device.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from personalize.models import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' multi-node helper, from the repository root
from bench.ray_overhead import concepts  # noqa: E402
from tests.pipelines.ray_nodes import LocalCluster, cluster_env  # noqa: E402


def batch_config(folder: Path, model: Path, manifest: Path, steps: int, concurrent: int) -> Path:
    path = folder / f"batch-{concurrent}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"scaling-{concurrent}", "model": str(model), "methods": ["textual_inversion"], "concepts": str(manifest),
        "storage": str(folder / f"store-{concurrent}"), "resolution": 64, "latent_variants": 2, "evaluation": None,
        "tracking": {"enabled": False}, "samples": {"steps": 2, "seeds": [0], "heatmaps": False, "every_stage": False},
        "method_overrides": {"textual_inversion": {"stages.embedding.steps": steps, "stages.embedding.batch_size": 2}},
        "resources": {"cpus_per_run": 1, "max_concurrent_runs": concurrent}}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="Textual Inversion steps per run")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4], help="concurrent runs to measure")
    parser.add_argument("--cpus-per-node", type=int, default=3, help="logical CPUs each node offers Ray")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="scale-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    cluster = LocalCluster(folder / "nodes", cluster_env({}))
    rows = []
    try:
        model = build_tiny_model(folder / "model")
        manifest = concepts(folder / "concepts", args.concepts)
        cluster.start_head(cpus=args.cpus_per_node)
        cluster.add_worker("worker", cpus=args.cpus_per_node)
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "HOME": str(folder / "driver-home")}
        for concurrent in args.levels:
            config = batch_config(folder, model, manifest, args.steps, concurrent)
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "cluster.cli", "batch", str(config)], env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - began
            if done.returncode != 0:
                raise RuntimeError(f"the batch at {concurrent} concurrent runs failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            results = pd.read_parquet(folder / f"store-{concurrent}" / "results" / "results.parquet")
            rows.append({"concurrent": concurrent, "seconds": round(seconds, 1),
                         "concepts_per_hour": round(3600 * args.concepts / seconds, 1),
                         "finished": int((results["status"] == "finished").sum()), "nodes": results["node"].nunique()})
            print(f"{concurrent} concurrent: {seconds:.1f} s", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    table = pd.DataFrame(rows)
    table["scaling"] = (table["concepts_per_hour"] / table["concepts_per_hour"].iloc[0]).round(2)
    print(f"\n{args.concepts} concepts x Textual Inversion ({args.steps} steps) on 2 nodes of {args.cpus_per_node} "
          f"logical CPUs each, {os.cpu_count()} cores on this machine:")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
