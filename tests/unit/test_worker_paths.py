"""A Ray worker on another machine (or under another home folder) trains into its own mirror of an s3 root."""

import shutil
from pathlib import Path

from tests.conftest import draw_concept


def specs_in(tmp_path, tiny_model, driver_root: Path):
    from personalize.config import resolve_runs
    from personalize.run_settings import ExperimentConfig

    images = draw_concept(tmp_path / "ball", n=2)
    return resolve_runs(ExperimentConfig.model_validate({
        "model": str(tiny_model), "method": "textual_inversion", "output_dir": str(driver_root / "runs"),
        "prior_cache_dir": str(driver_root / "cache" / "class_priors"),
        "concepts": [{"id": "ball", "images": str(images), "super_category": "ball"}]}))


def test_a_worker_moves_the_drivers_folders_into_its_own_mirror(tmp_path, tiny_model, monkeypatch):
    from pipelines.storage import StorageRoot
    from pipelines.worker import WorkerTask, on_this_node

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "driver-cache"))
    driver = StorageRoot("s3://bucket/store")
    [spec] = specs_in(tmp_path, tiny_model, driver.local_root)
    task = WorkerTask(specs=[spec], storage="s3://bucket/store")
    assert task.driver_root == str(driver.local_root)  # filled in where the task is made

    sent = WorkerTask.model_validate_json(task.model_dump_json())
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "node-cache"))
    node = StorageRoot("s3://bucket/store")
    moved = on_this_node(sent.specs[0], node, sent.driver_root)
    assert sent.driver_root == str(driver.local_root)
    assert moved.run_dir == node.local_root / "runs" / "ball" / "textual_inversion"
    assert moved.prior_cache_dir == str(node.local_root / "cache" / "class_priors")
    assert moved.latent_cache_dir is None and moved.config_hash() == spec.config_hash()
    assert on_this_node(spec, driver, task.driver_root) is spec  # the driver's own machine: nothing moves


def test_a_local_root_keeps_its_paths(tmp_path, tiny_model):
    from pipelines.storage import StorageRoot
    from pipelines.worker import on_this_node

    [spec] = specs_in(tmp_path, tiny_model, tmp_path / "store")
    assert on_this_node(spec, StorageRoot(str(tmp_path / "store")), "/elsewhere") is spec


def test_a_run_restored_from_rays_checkpoint_gets_its_earlier_stages_pictures(tmp_path, tiny_model, monkeypatch):
    import ray.train
    from ray.train import Checkpoint

    from pipelines.worker import carry_stage_images, checkpoint_name, restore_from_ray

    [spec] = specs_in(tmp_path, tiny_model, tmp_path / "lost-node")
    for picture in ("samples/stage-00-token.png", "attention/stage-00-token.png"):
        (spec.run_dir / picture).parent.mkdir(parents=True, exist_ok=True)
        (spec.run_dir / picture).write_bytes(picture.encode())
    stage = spec.run_dir / "checkpoints" / "stage-00-token"
    stage.mkdir(parents=True)
    (stage / "cursor.json").write_text("{}")
    carry_stage_images(spec.run_dir, stage)
    reported = tmp_path / "ray-storage" / checkpoint_name(spec, stage)  # Ray's copy, under the run's name
    shutil.copytree(stage, reported)

    [resumed] = specs_in(tmp_path / "other", tiny_model, tmp_path / "new-node")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: Checkpoint.from_directory(str(reported)))
    restore_from_ray(resumed)
    assert (resumed.run_dir / "checkpoints" / "stage-00-token" / "cursor.json").is_file()
    for picture in ("samples/stage-00-token.png", "attention/stage-00-token.png"):
        assert (resumed.run_dir / picture).read_bytes() == picture.encode()
