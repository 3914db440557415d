"""One progress line for a sweep, in place of Tune's trial table (shown with `-v`): trials pending, running,
ended and failed, and the best objective reported so far with its trial's values."""

from __future__ import annotations

import json
import time
from collections import Counter

from ray.tune import Callback

STATES = (("PENDING", "pending"), ("RUNNING", "running"), ("TERMINATED", "ended"), ("ERROR", "failed"))


def progress_line(trials, elapsed_s: float) -> str:
    """trials: Tune's Trial objects (status, trial_id, last_result, config)."""
    counts = Counter(t.status for t in trials)
    parts = [f"{counts.get(state, 0)} {word}" for state, word in STATES]
    reported = [t for t in trials if (t.last_result or {}).get("objective") is not None]
    line = f"sweep {elapsed_s / 60:.1f} min: trials {', '.join(parts)}"
    if reported:
        best = max(reported, key=lambda t: t.last_result["objective"])
        overrides = json.dumps((best.config or {}).get("overrides", {}), sort_keys=True)
        line += f"; best objective so far {best.last_result['objective']:.4f} (trial {best.trial_id}: {overrides})"
    return line


class SweepProgress(Callback):
    """Prints progress_line at most every every_s seconds, and once when the sweep ends. Tune pickles its callbacks
    with the experiment's state: clock and out are looked up when called (None: the real ones)."""

    def __init__(self, every_s: float = 20.0, clock=None, out=None):
        self.every_s, self.clock, self.out = every_s, clock, out
        self.began = self.last = self.now()

    def now(self) -> float:
        return (self.clock or time.monotonic)()

    def say(self, text: str) -> None:
        (self.out or print)(text, flush=True)

    def on_step_end(self, iteration, trials, **info):
        if self.now() - self.last >= self.every_s:
            self.last = self.now()
            self.say(progress_line(trials, self.last - self.began))

    def on_experiment_end(self, trials, **info):
        self.say(progress_line(trials, self.now() - self.began))
