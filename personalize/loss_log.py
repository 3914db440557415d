"""A run's own records on disk: per-step losses and stage timings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from personalize.method_spec import StageSpec

LOSSES = "losses.csv"
TIMINGS = "stages.json"


class FileSink:
    """Writes train/<stage>/<term> values to losses.csv; a resumed run drops rows past its checkpoint first."""

    def __init__(self, run_dir: Path, resume_from_step: int | None = None):
        self.path = run_dir / LOSSES
        self.timings_path = run_dir / TIMINGS
        kept = []
        if resume_from_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) < resume_from_step]
        self._write(kept, "w")

    def _write(self, rows: list[dict], mode: str) -> None:
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "metric", "value"])
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._write([{"step": step, "metric": k, "value": f"{v:.8g}"} for k, v in metrics.items()], "a")

    def stage_finished(self, index: int, stage: StageSpec, checkpoint: Path, seconds: float) -> None:
        timings = read_timings(self.path.parent)
        timings[stage.name] = {"index": index, "seconds": round(seconds, 3), "steps": stage.steps, "checkpoint": str(checkpoint)}
        self.timings_path.write_text(json.dumps(timings, indent=1))

    def validated(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        pass  # the validator writes validation.csv itself


class MultiSink:
    def __init__(self, *sinks):
        self.sinks = [s for s in sinks if s is not None]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log_metrics(metrics, step)

    def stage_finished(self, index: int, stage: StageSpec, checkpoint: Path, seconds: float) -> None:
        for s in self.sinks:
            s.stage_finished(index, stage, checkpoint, seconds)

    def validated(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        for s in self.sinks:
            s.validated(step, metrics, grid)


def read_timings(run_dir: Path) -> dict:
    path = Path(run_dir) / TIMINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def read_losses(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LOSSES
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{"step": int(r["step"]), "metric": r["metric"], "value": float(r["value"])} for r in csv.DictReader(f)]
