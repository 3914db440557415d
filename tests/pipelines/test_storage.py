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


def test_base_model_folder_from_s3_loads_like_the_local_one(seaweedfs, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    storage.upload_dir(tiny_model, "s3://personalize/models/tiny", marker="model_index.json")
    remote = load_components("s3://personalize/models/tiny")
    local = load_components(str(tiny_model))
    assert remote.path != local.path and remote.source == "s3://personalize/models/tiny"
    for (name, a), (_, b) in zip(remote.unet.state_dict().items(), local.unet.state_dict().items()):
        assert torch.equal(a, b), name
    StableDiffusionPipeline.from_pretrained(str(remote.path))


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
