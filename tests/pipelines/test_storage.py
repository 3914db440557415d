"""Object storage against a real SeaweedFS: concept images, a base model folder and artifacts through s3://,
and an interrupted upload that never looks finished."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from personalize import storage
from personalize.images import load_concept_images
from personalize.models import load_components
from tests.conftest import draw_concept


def test_concept_images_from_s3(seaweedfs, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    folder = draw_concept(tmp_path / "dog", n=3)
    assert storage.upload_dir(folder, "s3://personalize/concepts/dog") == 3
    images = load_concept_images("dog", "s3://personalize/concepts/dog", resolution=64)
    assert [im.size for im in images] == [im.size for im in load_concept_images("dog", folder, resolution=64)]
    assert list(images[0].getdata()) == list(load_concept_images("dog", folder, 64)[0].getdata())
    from personalize.errors import ConceptError

    with pytest.raises(ConceptError, match="nothing is stored under s3://personalize/concepts/nobody"):
        load_concept_images("nobody", "s3://personalize/concepts/nobody", resolution=64)


def test_a_concept_manifest_in_the_bucket_resolves_its_folders_there(seaweedfs, tmp_path, monkeypatch):
    from personalize.config import read_manifest
    from personalize.errors import ConfigError
    from pipelines.config import split_manifest

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    storage.upload_dir(draw_concept(tmp_path / "dog", n=3), "s3://personalize/lab/photos/dog")
    manifest = ("- {id: dog, images: photos/dog, super_category: dog}\n"
                "- {id: cat, images: s3://elsewhere/cat, super_category: cat}\n"
                "- {id: ../escape, images: photos/x, super_category: toy}\n"
                "- {id: local, images: /data/photos/x, super_category: toy}\n"
                "- {id: outside, images: ../../../other/x, super_category: toy}\n")
    storage.write_bytes("s3://personalize/lab/manifests/concepts.yaml", manifest.replace("photos/", "../photos/").encode())
    good, bad = read_manifest("s3://personalize/lab/manifests/concepts.yaml")
    assert [(c.id, c.images) for c in good] == [("dog", "s3://personalize/lab/photos/dog"), ("cat", "s3://elsewhere/cat")]
    assert list(bad) == ["../escape", "local", "outside"]
    assert "is a path on some machine, but the manifest is in bucket personalize" in bad["local"]
    assert "leaves bucket personalize" in bad["outside"]
    assert len(load_concept_images("dog", good[0].images, resolution=64)) == 3

    class Batch:  # the part of a batch config split_manifest reads
        concepts = "s3://personalize/lab/manifests/concepts.yaml"

        def model_copy(self, update):
            return update

    assert [c.id for c in split_manifest(Batch(), tmp_path)[0]["concepts"]] == ["dog", "cat"]
    with pytest.raises(ConfigError, match=r"(?s)s3://personalize/lab/none.yaml: 1 problem.*cannot be read \(NoSuchKey"):
        read_manifest("s3://personalize/lab/none.yaml")


def test_base_model_folder_from_s3_loads_like_the_local_one(seaweedfs, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    storage.upload_dir(tiny_model, "s3://personalize/models/tiny", marker="model_index.json")
    remote = load_components("s3://personalize/models/tiny")
    local = load_components(str(tiny_model))
    assert remote.path != local.path and remote.source == "s3://personalize/models/tiny"
    for (name, a), (_, b) in zip(remote.unet.state_dict().items(), local.unet.state_dict().items()):
        assert torch.equal(a, b), name
    StableDiffusionPipeline.from_pretrained(str(remote.path))


def test_a_model_on_s3_brings_its_recipe_scale(seaweedfs):
    from personalize.scaling import load_recipe_scale

    assert load_recipe_scale("s3://personalize/models/no-scale-here") is None
    storage.write_bytes("s3://personalize/models/scaled/recipe_scale.json", b'{"lr": {"unet": 20}}')
    assert load_recipe_scale("s3://personalize/models/scaled").lr == {"unet": 20}


def test_artifacts_round_trip_and_the_marker_goes_last(seaweedfs, tmp_path):
    run = tmp_path / "run"
    (run / "attention").mkdir(parents=True)
    (run / "learned_embeds.safetensors").write_bytes(b"x" * 40_000_000)  # above the multipart threshold
    (run / "attention" / "stage-00.png").write_bytes(b"png")
    (run / "DONE.json").write_text("{}")
    order = []
    s3 = storage.client()
    original = s3.upload_file

    def recording(path, bucket, key, **kw):
        order.append(key.rsplit("/", 1)[-1])
        return original(path, bucket, key, **kw)

    s3.upload_file = recording
    storage.upload_dir(run, "s3://personalize/runs/a", marker="DONE.json", s3=s3)
    assert order[-1] == "DONE.json"
    back = storage.download_prefix("s3://personalize/runs/a", tmp_path / "back", marker="DONE.json")
    assert (back / "learned_embeds.safetensors").stat().st_size == 40_000_000
    assert (back / "attention" / "stage-00.png").read_bytes() == b"png"


def test_an_interrupted_upload_leaves_no_finished_marker(seaweedfs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("a.safetensors", "b.safetensors", "c.json"):
        (run / name).write_text(name)
    (run / "DONE.json").write_text("{}")
    s3 = storage.client()
    original, calls = s3.upload_file, []

    def dies_on_second(path, bucket, key, **kw):
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionError("network went away")
        return original(path, bucket, key, **kw)

    s3.upload_file = dies_on_second
    with pytest.raises(ConnectionError):
        storage.upload_dir(run, "s3://personalize/runs/interrupted", marker="DONE.json", s3=s3)
    assert not storage.exists("s3://personalize/runs/interrupted/DONE.json")
    assert storage.exists("s3://personalize/runs/interrupted/a.safetensors")
    with pytest.raises(FileNotFoundError, match="not finished"):
        storage.download_prefix("s3://personalize/runs/interrupted", tmp_path / "x", marker="DONE.json")


def counting(s3, method: str) -> list[str]:
    """Record the keys `method` (upload_file or download_file) is called with, still doing the transfer."""
    calls, original = [], getattr(s3, method)

    def recording(*args, **kw):
        calls.append(args[1] if method == "download_file" else args[2])
        return original(*args, **kw)

    setattr(s3, method, recording)
    return calls


def test_a_mirror_follows_the_bucket_not_what_it_held_before(seaweedfs, tmp_path):
    """A local copy of the same size left from another bucket's life is replaced, a file deleted from the bucket
    goes from the copy, and files already in sync move neither way."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text('{"model": "/new/place"}')
    (source / "gone.txt").write_text("old")
    storage.upload_dir(source, "s3://personalize/mirror/a")
    mirror = tmp_path / "mirror"
    storage.download_prefix("s3://personalize/mirror/a", mirror)
    (mirror / "config.json").write_text('{"model": "/old/place"}')  # same size, other content
    storage.client().delete_object(Bucket="personalize", Key="mirror/a/gone.txt")
    storage.download_prefix("s3://personalize/mirror/a", mirror)
    assert (mirror / "config.json").read_text() == '{"model": "/new/place"}'
    assert not (mirror / "gone.txt").exists()

    s3 = storage.client()
    downloads = counting(s3, "download_file")
    storage.download_prefix("s3://personalize/mirror/a", mirror, s3=s3)
    assert downloads == []

    run = tmp_path / "run"  # a folder pushed with sync: a second push uploads only what changed, a pull nothing
    run.mkdir()
    for name in ("unet.safetensors", "DONE.json"):
        (run / name).write_text(name)
    assert storage.upload_dir(run, "s3://personalize/mirror/run", marker="DONE.json", sync=True) == 2
    (run / "eval.json").write_text("{}")
    uploads = counting(s3, "upload_file")
    assert storage.upload_dir(run, "s3://personalize/mirror/run", marker="DONE.json", s3=s3, sync=True) == 1
    assert uploads == ["mirror/run/eval.json"]
    storage.download_prefix("s3://personalize/mirror/run", run, s3=s3)
    assert downloads == []


def test_a_batch_on_s3_trusts_the_bucket_over_a_stale_local_copy(ray_with_s3, tiny_model, tiny_scorers, tmp_path):
    """The bucket is the record: a local copy of another configuration's run that the bucket does not hold (left
    from another server's life under the same prefix) is not taken for this run; a resubmission then skips the run
    and touches no file."""
    import json

    import pandas as pd

    from pipelines.batch import main
    from tests.pipelines.conftest import batch_file

    root = "s3://personalize/stale/store"
    concept = [{"id": "ball", "images": str(draw_concept(tmp_path / "ball", n=3)), "super_category": "ball"}]
    config = batch_file(tmp_path, tiny_model, tiny_scorers, root, concept, methods=["textual_inversion"], evaluation=None,
                        method_overrides={"textual_inversion": {"stages.embedding.steps": 2, "stages.embedding.batch_size": 1}})
    local = storage.local_mirror(root) / "runs" / "ball" / "textual_inversion"
    local.mkdir(parents=True)
    (local / "DONE.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "stages": {}, "outputs": []}))
    (local / "config.resolved.json").write_text('{"model": "/somewhere/gone"}')

    assert main([config]) == 0
    frame = pd.read_parquet(storage.local_mirror(root) / "results" / "results.parquet")
    assert list(frame["status"]) == ["finished"], list(frame["reason"])
    stored = json.loads(storage.read_bytes(f"{root}/runs/ball/textual_inversion/DONE.json"))
    assert stored["config_hash"] != "0123456789abcdef"
    assert json.loads((local / "DONE.json").read_text()) == stored
    assert json.loads((local / "config.resolved.json").read_text())["model"] == str(tiny_model)
    assert any(key.startswith("logs/") and "/worker-" in key for key, _ in storage.list_keys(root))  # Ray's logs, in the bucket

    before = {p: p.stat().st_mtime_ns for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert main([config]) == 0
    frame = pd.read_parquet(storage.local_mirror(root) / "results" / "results.parquet")
    assert list(frame["status"]) == ["skipped"]
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")} == before


def test_a_sweep_on_s3_stores_its_time_out_notes_and_removes_stopped_trials_from_the_bucket(seaweedfs, tmp_path, monkeypatch):
    """The trial's machine and the sweep's driver share only the bucket: each has its own mirror."""
    from pipelines.storage import StorageRoot
    from tuning.trial import TIMED_OUT, leave_timeout_note

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "worker"))
    worker = StorageRoot("s3://personalize/sweeps-root")
    leave_timeout_note(worker, "t1", "the trial ran longer than 60 s and was stopped")
    for rel in ("trials/t1/runs/blob/ti/DONE.json", "ray/sweep-t1/checkpoint/state.json", "trials/t2/runs/blob/ti/DONE.json"):
        worker.local(rel).parent.mkdir(parents=True, exist_ok=True)
        worker.local(rel).write_text("{}")
        worker.push_file(rel)

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "driver"))
    driver = StorageRoot("s3://personalize/sweeps-root")
    assert driver.local_root != worker.local_root
    assert driver.pull_file(f"trials/t1/{TIMED_OUT}")
    assert "longer than 60 s" in driver.local("trials", "t1", TIMED_OUT).read_text()

    driver.remove_tree("trials/t1/runs")
    driver.remove_tree("ray/sweep-t1")
    stored = {key for key, _ in storage.list_keys("s3://personalize/sweeps-root")}
    assert stored == {f"trials/t1/{TIMED_OUT}", "trials/t2/runs/blob/ti/DONE.json"}


def test_a_restarted_worker_skips_the_runs_its_pack_settled_in_the_bucket(seaweedfs, tiny_model, tmp_path, monkeypatch):
    """A pack restarted on another node sees only the bucket: a run finished there comes down whole and is not
    trained again, a run failed on bad input stays failed, and a failure of another configuration does not count."""
    import json

    from personalize.config import resolve_runs
    from personalize.run_settings import ExperimentConfig
    from pipelines.storage import StorageRoot
    from pipelines.worker import settled_before

    def specs_on(root: StorageRoot):
        images = draw_concept(tmp_path / "photos", n=2)
        return resolve_runs(ExperimentConfig.model_validate({
            "model": str(tiny_model), "method": "textual_inversion", "output_dir": str(root.local("runs")),
            "concepts": [{"id": name, "images": str(images), "super_category": "ball"}
                         for name in ("finished", "bad", "other", "fresh")]}))

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "lost-node"))
    lost = StorageRoot("s3://personalize/packs/store")
    finished, bad, other, _ = specs_on(lost)
    finished.run_dir.mkdir(parents=True)
    (finished.run_dir / "learned_embeds.safetensors").write_bytes(b"weights")
    (finished.run_dir / "DONE.json").write_text(json.dumps({"config_hash": finished.config_hash(), "stages": {}}))
    lost.push(lost.relative(finished.run_dir), marker="DONE.json")
    for spec, digest in ((bad, bad.config_hash()), (other, "0123456789abcdef")):
        spec.run_dir.mkdir(parents=True)
        (spec.run_dir / "FAILED.json").write_text(json.dumps({"reason": "no images", "config_hash": digest}))
        lost.push_file(f"{lost.relative(spec.run_dir)}/FAILED.json")

    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "new-node"))
    here = StorageRoot("s3://personalize/packs/store")
    assert here.local_root != lost.local_root
    specs = specs_on(here)
    assert [settled_before(spec, here) for spec in specs] == [True, True, False, False]
    assert (specs[0].run_dir / "learned_embeds.safetensors").read_bytes() == b"weights"
