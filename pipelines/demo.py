"""`personalize demo`: draw two held-out concepts of the micro world, then run the demo batch on it (local Ray,
local MLflow under ./mlruns): three methods trained, sampled in new scenes, scored, tabulated."""

from __future__ import annotations

from pathlib import Path

from microworld.concepts import CONCEPTS, write_concepts
from personalize.config import CONFIG_ROOT
from pipelines.batch import main as batch_main


def main(output: str = "outputs/demo", extra: list[str] | None = None) -> int:
    concepts = write_concepts(Path(output) / "concepts", (CONCEPTS[0], CONCEPTS[5]))
    overrides = [f"concepts={concepts.resolve()}", f"storage={Path(output).resolve()}", *(extra or [])]
    code = batch_main([str(CONFIG_ROOT / "batch" / "demo.yaml"), *overrides])
    if code == 0:
        print(f"\nsamples and reports under {output}/runs/<concept>/<method>/ (eval/*/report.html); compare the runs in "
              "MLflow: mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    return code
