"""The micro world: a deterministic renderer whose captions parse back into their labels, two-colour training
objects, held-out concepts each with a mark the training distribution never shows."""

import random

import numpy as np
import pytest
import yaml
from PIL import Image

from microworld.concepts import CONCEPTS, holdout_photos, photos, write_concepts, write_pair
from microworld.world import (
    COLOURS,
    PATTERNS,
    SCENES,
    SHAPES,
    STYLES,
    Caption,
    Scene,
    caption,
    parse_caption,
    random_scene,
    render,
    training_caption,
)
from personalize.config import load_manifest


def test_the_world_has_the_promised_variety():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(PATTERNS) >= 4 and len(SCENES) >= 6
    assert {"photo", "sketch", "blurry"} <= set(STYLES)


def test_rendering_is_deterministic_per_seed():
    a, b, c = render(random_scene(7)), render(random_scene(7)), render(random_scene(8))
    assert a.size == (64, 64) and a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_captions_parse_back_into_their_labels():
    rng = random.Random(0)
    for seed in range(300):
        scene = random_scene(seed)
        t = scene.thing
        full = parse_caption(caption(scene))
        assert full == Caption(scene.style, t.colour, t.pattern, t.shape, scene.scene, t.pattern_colour)
        short = parse_caption(training_caption(scene, rng))
        assert short.shape == t.shape and short.style == scene.style
        assert short.colour in (None, t.colour) and short.scene in (None, scene.scene)
    assert caption(Scene(random_scene(1).thing.__class__("circle", "orange", "plain"), "beach")) == "a photo of an orange circle on the beach"
    with pytest.raises(ValueError):
        parse_caption("a photo of a dog")


def test_two_colour_captions_name_the_pattern_colour_only_beside_the_body_colour():
    thing = random_scene(1).thing.__class__("star", "yellow", "striped", "purple")
    scene = Scene(thing, "beach")
    assert caption(scene) == "a photo of a yellow and purple striped star on the beach"
    assert caption(scene, keep_colour=False) == "a photo of a striped star on the beach"
    assert caption(scene, keep_pattern=False) == "a photo of a yellow star on the beach"
    assert parse_caption("a sketch of an orange and blue dotted heart") == Caption("sketch", "orange", "dotted", "heart", None, "blue")
    for wrong in ("a photo of a red and red striped star", "a photo of an and blue striped star", "a photo of a red and blue star"):
        with pytest.raises(ValueError):
            parse_caption(wrong)


def test_training_objects_draw_patterns_in_white_or_a_second_colour_and_never_a_mark():
    things = [random_scene(s).thing for s in range(2000)]
    patterned = [t for t in things if t.pattern != "plain"]
    coloured = [t for t in patterned if t.pattern_colour]
    assert all(t.pattern_colour is None for t in things if t.pattern == "plain")
    assert all(t.pattern_colour != t.colour for t in coloured)
    assert 0.5 < len(coloured) / len(patterned) < 0.7  # 60 % of patterns in a second colour, the rest white
    assert {t.pattern_colour for t in coloured} == set(COLOURS)
    assert all(t.mark == "none" for t in things)


def test_every_held_out_concept_carries_a_mark_no_training_object_has():
    assert len(CONCEPTS) >= 8 and {c.kind for c in CONCEPTS} == {"object", "animate"}
    for concept in CONCEPTS:
        assert concept.mark != "none"
        assert concept.shape in SHAPES
        shots = photos(concept, 5)
        assert len({s.scene for s in shots}) == 5 and len({s.thing.angle for s in shots}) == 5
        assert all(s.thing.shape == concept.shape and s.thing.pattern_colour == concept.pattern_colour for s in shots)
        assert all(s.thing.mark == concept.mark for s in shots)


def test_written_concepts_load_as_a_manifest_with_masks(tmp_path):
    manifest = write_concepts(tmp_path, CONCEPTS[:2], count=4)
    concepts = load_manifest(manifest)
    assert [c.id for c in concepts] == ["zebra-star", "berry-heart"]
    assert concepts[0].super_category == "star" and len(list((tmp_path / "zebra-star").glob("*.png"))) == 4
    assert concepts[0].masks == str(tmp_path / "zebra-star-masks")
    row = write_pair(tmp_path, CONCEPTS[0], CONCEPTS[1])
    assert [s["super_category"] for s in row["subjects"]] == ["star", "heart"]
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump({"concepts": [row]}))
    (pair,) = load_manifest(tmp_path / "pair.yaml")
    assert pair.masks == str(tmp_path / f"{row['id']}-masks") and pair.holdout == str(tmp_path / f"{row['id']}-holdout")
    # one mask for the one training photo: both subjects (centred at x = 0.28 and 0.72) white, the corners black
    mask = np.asarray(Image.open(tmp_path / row["masks"] / "0.png"))
    assert [p.name for p in (tmp_path / row["masks"]).iterdir()] == ["0.png"] and mask.shape == (64, 64)
    assert mask[35, 18] == 255 and mask[35, 46] == 255
    assert mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0
    assert 0.15 < (mask > 127).mean() < 0.5


def test_written_concepts_have_held_out_photos_unlike_the_training_photos(tmp_path):
    concepts = load_manifest(write_concepts(tmp_path, CONCEPTS[:2], count=4))
    for concept in concepts:
        assert concept.holdout == str(tmp_path / f"{concept.id}-holdout")  # resolved like images and masks
        training = [p.read_bytes() for p in sorted((tmp_path / concept.id).glob("*.png"))]
        holdout = [p.read_bytes() for p in sorted((tmp_path / f"{concept.id}-holdout").glob("*.png"))]
        assert len(holdout) == 8 and len(set(holdout)) == 8 and not set(holdout) & set(training)
    scenes = holdout_photos(CONCEPTS[0])
    assert scenes == holdout_photos(CONCEPTS[0])  # deterministic
    assert len({s.style for s in scenes}) > 1 and len({s.scene for s in scenes}) > 1
    training_poses = {(s.thing.x, s.thing.y, s.thing.angle) for s in photos(CONCEPTS[0], 4)}
    assert not {(s.thing.x, s.thing.y, s.thing.angle) for s in scenes} & training_poses
