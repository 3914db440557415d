"""The sweep's progress line: trial counts by state and the best objective so far, printed every so often."""

import pickle
from types import SimpleNamespace

from tuning.progress import SweepProgress, progress_line


def trial(status, trial_id, objective=None, overrides=None):
    return SimpleNamespace(status=status, trial_id=trial_id, config={"overrides": overrides or {}},
                           last_result={} if objective is None else {"objective": objective})


TRIALS = [trial("RUNNING", "a", 0.5, {"stages.token.steps": 1}), trial("TERMINATED", "b", 0.75, {"stages.token.steps": 2}),
          trial("PENDING", "c"), trial("ERROR", "d"), trial("RUNNING", "e")]


def test_the_line_counts_trials_by_state_and_names_the_best_so_far():
    line = progress_line(TRIALS, 90)
    assert line.startswith("sweep 1.5 min: trials 1 pending, 2 running, 1 ended, 1 failed")
    assert 'best objective so far 0.7500 (trial b: {"stages.token.steps": 2})' in line
    assert "best" not in progress_line([trial("PENDING", "c")], 0)


def test_the_callback_prints_at_most_every_interval_and_at_the_end():
    now, printed = [0.0], []
    callback = SweepProgress(every_s=20, clock=lambda: now[0], out=lambda text, flush: printed.append(text))
    for t in (5, 19, 21, 30, 42):
        now[0] = t
        callback.on_step_end(0, TRIALS)
    assert [line.split(":")[0] for line in printed] == ["sweep 0.3 min", "sweep 0.7 min"]  # at 21 s and 42 s
    callback.on_experiment_end(TRIALS)
    assert len(printed) == 3


def test_the_callback_pickles_as_tune_stores_it():
    assert pickle.loads(pickle.dumps(SweepProgress())).every_s == 20.0
