"""`personalize demo`: draw two held-out concepts of the micro world, then run the demo batch on it (local Ray,
local MLflow under ./mlruns): three methods trained, sampled in new scenes, scored, tabulated."""

from __future__ import annotations

import argparse
from pathlib import Path

from microworld.concepts import CONCEPTS, write_concepts
from personalize.locations import CONFIG_ROOT
from pipelines.batch import main as batch_main
from pipelines.config import load_batch
from pipelines.demo_sheet import demo_sheet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personalize demo", description=__doc__)
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray's worker logs and the libraries' notices here too")
    parser.add_argument("overrides", nargs="*", help="batch overrides, e.g. methods=[core] steps_scale=0.5")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output
    concepts = write_concepts(Path(output) / "concepts", (CONCEPTS[0], CONCEPTS[5]))
    overrides = [f"concepts={concepts.resolve()}", f"storage={Path(output).resolve()}", *args.overrides]
    code = batch_main([*(["-v"] if args.verbose else []), str(CONFIG_ROOT / "batch" / "demo.yaml"), *overrides])
    if code == 0:
        methods = load_batch(CONFIG_ROOT / "batch" / "demo.yaml", overrides)[0].methods
        sheet = demo_sheet(Path(output) / "runs", Path(output) / "concepts", methods, Path(output) / "samples-overview.png")
        if sheet is not None:
            print(f"\nevery concept's photos and each method's samples in one picture: {sheet}")
        print(f"\nsamples and reports under {output}/runs/<concept>/<method>/ (eval/*/report.html); compare the runs in "
              "MLflow: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    return code
