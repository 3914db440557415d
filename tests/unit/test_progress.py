"""The batch's progress line: counts, each training run's step from its own files, the time left."""

from pipelines.progress import Progress, position


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_runs_position_comes_from_its_finished_stages_and_its_losses(spec_for):
    spec = spec_for("rare_two_stage", stage_overrides={"steps": 5})
    assert position(spec) == (0, 10)
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "stages.json").write_text('{"token": {"index": 0, "seconds": 1.0, "steps": 5}}')
    (spec.run_dir / "losses.csv").write_text("step,metric,value\n6,train/model/loss,0.5\n")
    assert position(spec) == (7, 10)


def test_the_line_counts_runs_and_estimates_the_time_left_from_steps(spec_for):
    clock = Clock()
    first, second = spec_for("textual_inversion", stage_overrides={"steps": 10}), spec_for("textual_inversion", seed=1, stage_overrides={"steps": 10})
    progress = Progress([first, second], every_s=20, clock=clock)
    assert not progress.due()
    clock.now = 120.0
    assert progress.due() and not progress.due()
    progress.record(first, "finished")  # half the steps in 2 minutes: 2 minutes left
    line = progress.line([second], queued=0)
    assert line == "[  2.0 min] 0 queued, 1 training, 1 finished, 0 failed, about 2 min of training left | blob/textual_inversion 0/10"
    progress.record(second, "failed")
    assert ", 1 finished, 1 failed" in progress.line([], queued=0)
