"""Quality benchmark of every method in the micro world, run as `personalize batch`es (see microworld/quality.py).

    python bench/quality.py                  # default: the papers' 7 methods, 2 concepts x 2 seeds, 40-75 min on 2 CPU cores
    python bench/quality.py --full           # 8 concepts x 3 seeds, the model-scaled papers' step counts (a GPU)
    python bench/quality.py --methods core dreambooth --concepts 4 --seeds 2

Local Ray by default; under `ray job submit` (or with RAY_ADDRESS set) the batches run on that cluster. Prints
the table and writes docs/quality.md (with the claims table), quality.csv, quality_runs.csv, quality_separation.csv
and quality.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from microworld.quality import Setting, run, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--concepts", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--work", default="outputs/quality", help="batch storage: runs, samples and evaluations")
    parser.add_argument("--docs", default="docs", help="where the table and plot go")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the last run's table")
    args = parser.parse_args()
    setting = Setting.full() if args.full else Setting()
    for key in ("methods", "concepts", "seeds"):
        if getattr(args, key) is not None:
            setattr(setting, key, getattr(args, key))
    from pipelines.cluster import setup_logging

    setup_logging()
    work = Path(args.work)
    if args.report_only:  # the setting that made the table, not this command line's
        frame, minutes = pd.read_csv(work / "quality_runs.csv"), float((work / "wall_minutes.txt").read_text())
        separation_csv = work / "quality_separation.csv"
        separation = pd.read_csv(separation_csv) if separation_csv.is_file() else None
        setting = Setting(**json.loads((Path(args.docs) / "quality_setting.json").read_text()))
    else:
        began = time.perf_counter()
        frame, separation = run(work, setting)
        minutes = (time.perf_counter() - began) / 60
        (work / "wall_minutes.txt").write_text(f"{minutes:.2f}\n")
    paths = write_report(frame, setting, Path(args.docs), minutes, separation, work)
    print(paths["markdown"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
