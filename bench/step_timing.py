"""What the step-time benchmarks share: a sink that stamps each logged step, and their command-line options."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from personalize.loss_log import FileSink


class TimingSink(FileSink):
    """The loop's file sink, plus the time each step's losses were logged (one per optimizer step)."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.stamps: list[float] = []

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        self.stamps.append(time.perf_counter())


def step_timing_parser(description: str, archs: list[str], batch: int, steps: int, rounds: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=archs, default=archs[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved repetitions; the best of each counts")
    return parser
