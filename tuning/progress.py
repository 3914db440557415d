"""One progress line for a sweep, in place of Tune's trial table (shown with `-v`): trials pending, running,
ended and failed, and the best objective reported so far with its trial's values."""

from __future__ import annotations

import json
import time
from collections import Counter

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


def progress_callback(every_s: float = 20.0, clock=time.monotonic, out=print):
    """A Tune callback printing progress_line at most every every_s seconds, and once when the sweep ends."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self):
            self.began = self.last = clock()

        def on_step_end(self, iteration, trials, **info):
            if clock() - self.last >= every_s:
                self.last = clock()
                out(progress_line(trials, self.last - self.began), flush=True)

        def on_experiment_end(self, trials, **info):
            out(progress_line(trials, clock() - self.began), flush=True)

    return SweepProgress()
