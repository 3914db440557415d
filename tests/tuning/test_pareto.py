"""The Pareto set of a sweep's trials on hand-made points (both axes maximised)."""

import pandas as pd

from tuning.sweep import pareto


def test_pareto_keeps_exactly_the_trials_no_other_beats_on_both_axes():
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e", "f"],
        "clip_t": [0.30, 0.20, 0.25, 0.10, 0.30, 0.05],
        "dino": [0.10, 0.40, 0.20, 0.40, 0.05, 0.05],
    })
    # d is beaten by b (same dino, lower clip_t); e by a (same clip_t, lower dino); f by everyone
    assert list(pareto(trials)["trial_id"]) == ["b", "c", "a"]  # sorted by clip_t
    tied = pd.DataFrame({"trial_id": ["x", "y"], "clip_t": [0.2, 0.2], "dino": [0.3, 0.3]})
    assert list(pareto(tied)["trial_id"]) == ["x", "y"]  # equal points beat neither
