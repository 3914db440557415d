"""A stopped trial's space is freed, but never a run it finished (a sweep interrupted after a trial's last step
and before Tune heard of it counts that trial as stopped)."""

from pipelines.storage import StorageRoot
from tuning.sweep import remove_trial_runs


def test_a_stopped_trial_loses_its_unfinished_runs_and_checkpoints_only(tmp_path):
    root = StorageRoot(str(tmp_path / "store"))
    runs = tmp_path / "store" / "trials" / "t1" / "runs"
    (runs / "ball" / "core").mkdir(parents=True)
    (runs / "ball" / "core" / "DONE.json").write_text("{}")
    (runs / "ball" / "core" / "learned_embeds.safetensors").write_text("x")
    (runs / "box" / "core" / "checkpoints" / "latest").mkdir(parents=True)
    ray_dir = tmp_path / "store" / "ray" / "sweep-t1"
    ray_dir.mkdir(parents=True)
    other = tmp_path / "store" / "trials" / "t2" / "runs" / "box" / "core"
    other.mkdir(parents=True)

    remove_trial_runs(root, "sweep", "t1", ["ball/core", "box/core"])

    assert (runs / "ball" / "core" / "DONE.json").is_file() and (runs / "ball" / "core" / "learned_embeds.safetensors").is_file()
    assert not (runs / "box" / "core").exists()
    assert not ray_dir.exists() and other.is_dir()


def test_a_stopped_trial_with_nothing_finished_leaves_no_runs_folder(tmp_path):
    root = StorageRoot(str(tmp_path / "store"))
    runs = tmp_path / "store" / "trials" / "t1" / "runs"
    (runs / "ball" / "core" / "checkpoints").mkdir(parents=True)
    remove_trial_runs(root, "sweep", "t1", ["ball/core"])
    assert not runs.exists()
