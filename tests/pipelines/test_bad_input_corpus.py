"""Bad input, as a user brings it, in one batch: every case that belongs to one concept fails only that concept
with a reason naming the thing and the fix (or, for unusual but valid photos, trains), and every good concept
finishes. Problems of the batch itself (config, model, storage, tracking) are refused before anything starts:
tests/unit/test_preflight.py, tests/pipelines/test_preflight_storage.py, tests/unit/test_config.py."""


from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from personalize.data import LatentBank
from pipelines.batch import main
from tests.conftest import draw_concept
from tests.pipelines.conftest import batch_file

pytestmark = [pytest.mark.slow]


def photo_folder(root, name, make):
    """A concept folder of two good photos and one made by `make(path)` (or none when make is None)."""
    folder = draw_concept(root / name, n=2)
    if make is not None:
        make(folder)
    return folder


def save(image, name):
    return lambda folder: image.save(folder / name)


def raw(name, data):
    return lambda folder: (folder / name).write_bytes(data)


def truncated(folder):
    (folder / "2.png").write_bytes((folder / "0.png").read_bytes()[:120])


def exif_rotated(folder):
    image = Image.new("RGB", (120, 80), (200, 30, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    image.save(folder / "2.jpg", exif=exif)


# concept id -> (how its folder is made, the expected status, words the reason must hold)
IMAGE_CASES = {
    "zero-byte": (raw("2.png", b""), "failed", ["2.png cannot be read", "replace or remove"]),
    "truncated": (truncated, "failed", ["2.png cannot be read", "truncated"]),
    "not-an-image": (raw("2.png", b"just some text, not a picture"), "failed", ["2.png cannot be read", "replace or remove"]),
    "svg": (raw("2.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"), "failed", ["not images: ['2.svg']", "accepted: jpg, png, webp"]),
    "one-pixel": (save(Image.new("RGB", (1, 1)), "2.png"), "failed", ["2.png is 1x1", "use larger photos or a lower resolution"]),
    "uncaptioned-token": (raw("0.txt", b"a ball on a beach"), "failed", ["caption 0.txt", "name the subject with {placeholder}"]),
    "orphan-caption": (raw("9.txt", b"a {placeholder}"), "failed", ["captions without an image: ['9.txt']", "photo.png -> photo.txt"]),
}


def unusual_but_valid(folder):
    """Photos a camera or an editor writes, each to be read as 8-bit RGB: CMYK, 16-bit, palette, EXIF-rotated, 6000x4000;
    one with its own caption file."""
    Image.new("CMYK", (80, 80), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    (folder / "cmyk.txt").write_text("a {placeholder} {class} in front of a cyan wall")
    Image.fromarray((np.arange(80 * 80).reshape(80, 80) * 9).astype(np.uint16)).save(folder / "sixteen-bit.png")
    Image.new("RGB", (80, 80), (10, 200, 10)).convert("P").save(folder / "palette.png")
    exif_rotated(folder)
    Image.new("RGB", (6000, 4000), (90, 90, 200)).save(folder / "huge.jpg")


@pytest.fixture(scope="module")
def corpus(local_ray, tiny_model, tiny_scorers, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    # the one concept that trains with both methods: two drawn photos and every unusual but valid format, under the
    # id of a common rare token (its placeholder <sks> is a new token: fine)
    concepts = [{"id": "sks", "images": str(photo_folder(root, "sks", unusual_but_valid)), "super_category": "dog"}]
    for name, (make, _, _) in IMAGE_CASES.items():
        concepts.append({"id": name, "images": str(photo_folder(root, name, make)), "super_category": "ball"})
    good = str(draw_concept(root / "good", n=2))
    (root / "empty").mkdir()
    concepts += [
        {"id": "empty-folder", "images": str(root / "empty"), "super_category": "ball"},
        {"id": "missing-folder", "images": str(root / "nowhere"), "super_category": "ball"},
        {"id": "../unsafe", "images": good, "super_category": "ball"},
        {"id": "café", "images": good, "super_category": "ball"},
        {"id": "twin", "images": good, "super_category": "ball"},
        {"id": "twin", "images": str(draw_concept(root / "twin-b", n=2)), "super_category": "ball"},
        {"id": "odd-kind", "images": good, "super_category": "ball", "kind": "plant"},
        {"id": "no-images", "super_category": "ball"},
        {"id": "no-class", "images": good},
        {"id": "fire-truck", "images": good, "super_category": "fire truck"},  # a class of two tokens
    ]
    (root / "concepts.yaml").write_text(yaml.safe_dump({"concepts": concepts}, allow_unicode=True))
    config = batch_file(root, tiny_model, tiny_scorers, root / "store", str(root / "concepts.yaml"),
                        methods=["textual_inversion", "attndreambooth"], evaluation=None,
                        method_overrides={"textual_inversion": {"stages.embedding.steps": 1, "stages.embedding.batch_size": 1},
                                          "attndreambooth": {f"stages.{s}.steps": 1 for s in ("embedding_alignment", "attention_refinement", "subject_identity")}})
    code = main([config])
    frame = pd.read_parquet(root / "store" / "results" / "results.parquet")
    return code, frame


def reasons(frame, concept):
    rows = frame[frame["concept"] == concept]
    assert len(rows) == 2, f"{concept}: {len(rows)} rows"
    return list(rows["status"]), " | ".join(rows["reason"])


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_each_image_case(corpus, case):
    _, frame = corpus
    _, expected, words = IMAGE_CASES[case]
    statuses, reason = reasons(frame, case)
    assert statuses == [expected] * 2, reason
    for word in words:
        assert word in reason
    if expected == "failed":
        assert f"concept '{case}'" in reason


@pytest.mark.parametrize(("case", "words"), [
    ("empty-folder", ["is empty", "add 3-6 photos"]),
    ("missing-folder", ["does not exist", "point `images` at a folder"]),
    ("../unsafe", ["unsafe", "use only letters, digits"]),
    ("café", ["unsafe", "use only letters, digits"]),
    ("twin", ["appears more than once", "give each concept its own id"]),
    ("odd-kind", ["kind", "object", "animate"]),
    ("no-images", ["images", "missing"]),
    ("no-class", ["give super_category"]),
])
def test_each_concept_case_fails_only_itself(corpus, case, words):
    _, frame = corpus
    statuses, reason = reasons(frame, case)
    assert statuses == ["failed", "failed"], reason
    for word in words:
        assert word in reason, reason


def test_a_two_token_class_trains_where_the_method_allows_it_and_is_named_where_not(corpus):
    _, frame = corpus
    rows = frame[frame["concept"] == "fire-truck"].set_index("method")
    assert rows.loc["textual_inversion", "status"] == "finished"
    assert rows.loc["attndreambooth", "status"] == "failed"
    assert "fire truck" in rows.loc["attndreambooth", "reason"] and "one" in rows.loc["attndreambooth", "reason"]


def test_the_good_concept_with_unusual_formats_finished_and_the_batch_succeeded(corpus):
    code, frame = corpus
    assert code == 0
    rows = frame[frame["concept"] == "sks"]
    assert list(rows["status"]) == ["finished", "finished"], " | ".join(rows["reason"])
    for run_dir in rows["run_dir"]:  # the two drawn photos and the five unusual ones, all trained on
        assert len(LatentBank.load(Path(run_dir) / "instance_latents.safetensors")) == 7
