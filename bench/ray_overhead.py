"""What Ray costs and buys: the wall time of one tiny run through `personalize batch` against the same run
through `personalize train` (in-process), and of N runs with 1 vs 2 concurrent runs (the scaling ratio).

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

import yaml

from personalize.models import build_tiny_model
from personalize.synthetic import DEFAULT_CONCEPTS, SyntheticConcept, write_concepts


def concepts(folder: Path, count: int) -> Path:
    extra = [SyntheticConcept(f"concept-{i}", "toy", "object", (30 * i % 255, 120, 200), (250, 250, 250), "ellipse")
             for i in range(max(0, count - len(DEFAULT_CONCEPTS)))]
    return write_concepts(folder, (list(DEFAULT_CONCEPTS) + extra)[:count], photos=4, size=96)


def timed(command: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="runs in the scaling measurement")
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

        def batch(name, manifest, concurrent):
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**common, "name": name, "methods": ["textual_inversion"], "concepts": str(manifest),
                                            "storage": str(tmp / name), "evaluation": None, "tracking": {"enabled": False},
                                            "method_overrides": {"textual_inversion": method_over},
                                            "resources": {"max_concurrent_runs": concurrent}}))
            return str(path)

        in_process = timed([*cli, "train", experiment("train-one", one)])
        on_ray = timed([*cli, "batch", batch("batch-one", one, 1)])
        serial = timed([*cli, "batch", batch("batch-serial", many, 1)])
        parallel = timed([*cli, "batch", batch("batch-parallel", many, 2)])
    print(f"\none tiny run ({args.steps} steps): personalize train {in_process:.1f} s, personalize batch {on_ray:.1f} s "
          f"-> ratio {on_ray / in_process:.2f} (Ray start, Ray Data preparation, a Train worker per run)")
    print(f"{args.runs} runs: 1 at a time {serial:.1f} s, 2 at a time {parallel:.1f} s -> speed-up {serial / parallel:.2f}")


if __name__ == "__main__":
    main()
