"""One progress line for a batch, printed every so often while its runs train: runs queued, training, finished
and failed, each training run's step (read from its own files when the run trains on this machine), and an
estimate of the training time left."""

from __future__ import annotations

import time

from personalize.loss_log import read_timings
from personalize.run_settings import RunSpec


def position(spec: RunSpec) -> tuple[int, int]:
    """(steps done, steps in all) of a run, from the files it has written so far (0 when none are here)."""
    total = sum(s.steps for s in spec.method.stages)
    done_stages = read_timings(spec.run_dir)
    steps = sum(t.get("steps", 0) for t in done_stages.values())
    losses = spec.run_dir / "losses.csv"
    if losses.is_file():
        with losses.open("rb") as f:
            f.seek(max(0, losses.stat().st_size - 200))
            last = f.read().decode(errors="ignore").strip().splitlines()[-1:]
        if last and last[0].split(",")[0].isdigit():
            steps = max(steps, int(last[0].split(",")[0]) + 1)
    return min(steps, total), total


def steps_of(spec: RunSpec) -> int:
    return sum(s.steps for s in spec.method.stages)


class Progress:
    """The time left is read from steps: the steps of the runs to train here, against those done so far."""

    def __init__(self, to_train: list[RunSpec], every_s: float = 20.0, clock=time.monotonic):
        self.clock, self.every_s = clock, every_s
        self.began = self.last = clock()
        self.total_steps = sum(steps_of(s) for s in to_train) or 1
        self.steps_done = 0
        self.finished = self.failed = 0

    def record(self, spec: RunSpec, status: str) -> None:
        self.steps_done += steps_of(spec)
        if status == "failed":
            self.failed += 1
        else:
            self.finished += 1

    def line(self, training: list[RunSpec], queued: int) -> str:
        runs, steps = [], self.steps_done
        for spec in training:
            done, total = position(spec)
            steps += done
            runs.append(f"{spec.concept.id}/{spec.method.name} {done}/{total}")
        elapsed = self.clock() - self.began
        fraction = steps / self.total_steps
        eta = f", about {elapsed * (1 - fraction) / fraction / 60:.0f} min of training left" if fraction >= 0.05 else ""
        return (f"[{elapsed / 60:5.1f} min] {queued} queued, {len(training)} training, {self.finished} finished, "
                f"{self.failed} failed{eta}" + (" | " + ", ".join(runs) if runs else ""))

    def due(self) -> bool:
        if self.clock() - self.last >= self.every_s:
            self.last = self.clock()
            return True
        return False
