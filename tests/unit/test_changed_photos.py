"""A finished run is reused only while its concept's photos are the ones it trained on: new photos in the same
folder are refused with the concept named and the fix, and the finished run is left as it was."""

import json

import pytest
from PIL import Image

from personalize.errors import RunStateError
from personalize.fingerprint import photos_fingerprint
from personalize.loop import run_method
from personalize.run_folder import DONE
from pipelines.storage import StorageRoot
from pipelines.train import earlier_outcome


@pytest.fixture
def finished(spec_for):
    spec = spec_for("textual_inversion")
    run_method(spec, progress=False)
    return spec


def folder_bytes(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_finished_run_records_its_photos_and_is_reused_while_they_stay(finished):
    done = json.loads((finished.run_dir / DONE).read_text())
    assert done["photos"] == photos_fingerprint(finished)
    assert run_method(finished, progress=False).status == "skipped"
    assert earlier_outcome(finished, StorageRoot(str(finished.output_dir))).status == "skipped"


@pytest.mark.parametrize("change", ["replaced photo", "added caption"])
def test_changed_photos_are_refused_and_the_finished_run_kept(finished, concept_dir, change):
    before = folder_bytes(finished.run_dir)
    if change == "replaced photo":
        Image.new("RGB", (80, 80), (10, 200, 10)).save(concept_dir / "0.png")
    else:
        (concept_dir / "1.txt").write_text("a photo of a blob on a table")
    with pytest.raises(RunStateError, match=r"blob: its photos, captions or masks changed .* delete") as error:
        run_method(finished, progress=False)
    assert str(finished.run_dir) in str(error.value)
    outcome = earlier_outcome(finished, StorageRoot(str(finished.output_dir)))
    assert outcome.status == "failed" and outcome.reason.startswith("blob: its photos")
    assert folder_bytes(finished.run_dir) == before


def test_runs_finished_before_photos_were_recorded_are_reused(finished, concept_dir):
    done_file = finished.run_dir / DONE
    done = json.loads(done_file.read_text())
    del done["photos"]
    done_file.write_text(json.dumps(done))
    Image.new("RGB", (80, 80), (10, 200, 10)).save(concept_dir / "0.png")
    assert run_method(finished, progress=False).status == "skipped"


@pytest.mark.parametrize("masked_loss", [True, False])
def test_a_changed_mask_counts_only_when_the_loss_is_masked_to_it(spec_for, concept_dir, tmp_path, masked_loss):
    masks = tmp_path / "masks"
    masks.mkdir()
    for photo in sorted(concept_dir.glob("*.png")):
        Image.new("L", Image.open(photo).size, 255).save(masks / photo.name)
    concept = {"id": "blob", "images": str(concept_dir), "masks": str(masks), "super_category": "toy"}
    spec = spec_for("textual_inversion", concept=concept, masked_loss=masked_loss)
    run_method(spec, progress=False)
    Image.new("L", Image.open(masks / "0.png").size, 0).save(masks / "0.png")
    if masked_loss:
        with pytest.raises(RunStateError, match="blob: its photos, captions or masks changed"):
            run_method(spec, progress=False)
    else:
        assert run_method(spec, progress=False).status == "skipped"


def test_photos_and_model_moved_elsewhere_hold_the_same_run(finished, spec_for, concept_dir, tiny_model, tmp_path):
    import shutil

    moved_photos = shutil.copytree(concept_dir, tmp_path / "elsewhere" / "photos")
    moved_model = shutil.copytree(tiny_model, tmp_path / "elsewhere" / "model")
    moved = spec_for("textual_inversion", model=moved_model,
                     concept={"id": "blob", "images": str(moved_photos), "super_category": "toy"})
    assert moved.run_dir == finished.run_dir and moved.config_hash() == finished.config_hash()
    before = folder_bytes(finished.run_dir)
    outcome = earlier_outcome(moved, StorageRoot(str(moved.output_dir)))
    assert outcome.status == "skipped", outcome.reason
    assert run_method(moved, progress=False).status == "skipped"
    assert folder_bytes(finished.run_dir) == before


def test_other_weights_at_a_moved_path_are_another_run(finished, spec_for, tiny_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    other = shutil.copytree(tiny_model, tmp_path / "retrained")
    weights = next((other / "unet").glob("*.safetensors"))
    save_file({k: v + 0.01 for k, v in load_file(weights).items()}, weights)
    retrained = spec_for("textual_inversion", model=other)
    assert retrained.config_hash() != finished.config_hash()
    outcome = earlier_outcome(retrained, StorageRoot(str(retrained.output_dir)))
    assert outcome.status == "failed" and "holds a run of a different configuration" in outcome.reason


def test_runs_whose_hash_named_the_folders_are_still_their_runs(finished):
    """Runs finished when the config hash included the photos' and model's paths keep being reused."""
    located = finished.config_hashes()[1]
    assert located != finished.config_hash()
    done_file = finished.run_dir / DONE
    done = json.loads(done_file.read_text())
    done_file.write_text(json.dumps({**done, "config_hash": located}))
    assert finished.owns(located) and not finished.owns("0123456789abcdef") and not finished.owns(None)
    assert run_method(finished, progress=False).status == "skipped"
    assert earlier_outcome(finished, StorageRoot(str(finished.output_dir))).status == "skipped"


def test_runs_whose_photos_fingerprint_named_the_folders_are_reused(finished, concept_dir):
    done_file = finished.run_dir / DONE
    done = json.loads(done_file.read_text())
    done_file.write_text(json.dumps({**done, "photos": photos_fingerprint(finished, folder_names=True)}))
    assert run_method(finished, progress=False).status == "skipped"
    Image.new("RGB", (80, 80), (10, 200, 10)).save(concept_dir / "0.png")
    with pytest.raises(RunStateError, match="blob: its photos, captions or masks changed"):
        run_method(finished, progress=False)


def test_a_run_part_way_resumes_only_on_the_photos_it_started_on(spec_for, concept_dir, tmp_path, monkeypatch):
    from personalize import checkpoint as ckpt
    from personalize.faults import InjectedFault

    spec = spec_for("rare_two_stage")
    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"model:1:{tmp_path / 'marker'}")
    with pytest.raises(InjectedFault):  # stopped in its second stage, after the first stage's checkpoint
        run_method(spec, progress=False)
    cursor = ckpt.latest(spec.run_dir).cursor
    assert cursor.photos == photos_fingerprint(spec)
    before = folder_bytes(spec.run_dir)
    Image.new("RGB", (80, 80), (10, 200, 10)).save(concept_dir / "0.png")
    with pytest.raises(RunStateError, match=r"blob: its photos, captions or masks changed since the run in .* started"):
        run_method(spec, progress=False, resume=True)
    assert folder_bytes(spec.run_dir) == before
