"""What Ray costs and buys: the wall time of one tiny run through `personalize batch` against the same run
through `personalize train` (in-process); the time each further run adds on Ray beyond what it adds in-process
(N runs, one at a time: packed into one Ray Train run, the default, and with a Train run each); the speed-up of
2 concurrent runs; and the peak memory of each command's whole process tree (proportional set size: shared
pages counted once), per concurrent run beyond the in-process figure.

    python bench/ray_overhead.py                 # tiny model, local Ray, CPU
    python bench/ray_overhead.py --runs 4 --steps 200

Evaluation is off in both paths (the comparison is about training); each measurement starts from empty storage.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from personalize.models import build_tiny_model
from personalize.synthetic import DEFAULT_CONCEPTS, SyntheticConcept, write_concepts


def concepts(folder: Path, count: int) -> Path:
    extra = [SyntheticConcept(f"concept-{i}", "toy", "object", (30 * i % 255, 120, 200), (250, 250, 250), "ellipse")
             for i in range(max(0, count - len(DEFAULT_CONCEPTS)))]
    return write_concepts(folder, (list(DEFAULT_CONCEPTS) + extra)[:count], photos=4, size=96)


def tree_pss(root: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants (Ray's daemons and workers included)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak memory of the command's process tree in GB), sampled every half second."""
    began, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_pss(watched))
            time.sleep(0.5)
        seconds = time.perf_counter() - began
        if proc.returncode != 0:
            out.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} failed:\n{out.read().decode()[-4000:]}")
    return seconds, peak / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="runs in the scaling measurement (at least 2)")
    parser.add_argument("--steps", type=int, default=60, help="Textual Inversion steps per run")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "cluster.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model")
        one = concepts(tmp / "one", 1)
        many = concepts(tmp / "many", args.runs)
        common = {"model": str(model), "resolution": 64, "latent_variants": 2,
                  "samples": {"steps": 2, "seeds": [0], "heatmaps": False, "every_stage": False}}
        method_over = {"stages.embedding.steps": args.steps, "stages.embedding.batch_size": 2}

        def experiment(name, manifest):
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**common, "method": "textual_inversion", "concepts": str(manifest),
                                            "output_dir": str(tmp / name), "overrides": method_over}))
            return str(path)

        def batch(name, manifest, concurrent, runs_per_trainer=None):
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**common, "name": name, "methods": ["textual_inversion"], "concepts": str(manifest),
                                            "storage": str(tmp / name), "evaluation": None, "tracking": {"enabled": False},
                                            "method_overrides": {"textual_inversion": method_over},
                                            "resources": {"max_concurrent_runs": concurrent,
                                                          "runs_per_trainer": runs_per_trainer}}))
            return str(path)

        (in_one, in_one_gb), (in_many, _) = (timed([*cli, "train", experiment("train-one", one)]),
                                             timed([*cli, "train", experiment("train-many", many)]))
        on_ray, ray_one_gb = timed([*cli, "batch", batch("batch-one", one, 1)])
        serial, _ = timed([*cli, "batch", batch("batch-serial", many, 1)])
        unpacked, _ = timed([*cli, "batch", batch("batch-unpacked", many, 1, runs_per_trainer=1)])
        parallel, parallel_gb = timed([*cli, "batch", batch("batch-parallel", many, 2)])
    runs = args.runs
    per_run_in_process = (in_many - in_one) / (runs - 1)
    per_run_on_ray = (serial - on_ray) / (runs - 1)
    per_run_unpacked = (unpacked - on_ray) / (runs - 1)
    print(f"\none tiny run ({args.steps} steps): personalize train {in_one:.1f} s, personalize batch {on_ray:.1f} s "
          f"-> ratio {on_ray / in_one:.2f}, {on_ray - in_one:.1f} s fixed (Ray start, Ray Data preparation, Ray Train)")
    print(f"each further run, one at a time: {per_run_on_ray:.1f} s on Ray against {per_run_in_process:.1f} s in-process "
          f"-> {per_run_on_ray - per_run_in_process:.1f} s of overhead a run "
          f"(with a Ray Train run each: {per_run_unpacked:.1f} s -> {per_run_unpacked - per_run_in_process:.1f} s)")
    print(f"{runs} runs: 1 at a time {serial:.1f} s, 2 at a time {parallel:.1f} s -> speed-up {serial / parallel:.2f}")
    print(f"peak memory (PSS of the process tree): in-process {in_one_gb:.2f} GB, one run on Ray {ray_one_gb:.2f} GB, "
          f"2 concurrent runs on Ray {parallel_gb:.2f} GB -> {(parallel_gb - ray_one_gb):.2f} GB a further concurrent run")


if __name__ == "__main__":
    main()
