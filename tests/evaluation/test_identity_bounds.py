"""Identity floor and ceiling: the normalisation, the leave-one-out ceiling, the held-out ceiling, and an
evaluation that computes the floor once per concept and shares it between methods."""

import json
import math

import pandas as pd
import pytest
import torch

import personalize.evaluation as evaluation
from personalize.evaluation import evaluate_run
from personalize.identity import (
    IDENTITY_SCORES,
    MIN_IDENTITY_RANGE,
    IdentityBounds,
    identity_metrics,
    normalised_identity,
)
from personalize.images import load_concept_images
from personalize.loop import run_method
from personalize.metrics import pairwise_mean
from personalize.report import write_comparison
from personalize.run_settings import EvaluationSpec
from personalize.scoring import Scorers, leave_one_out_mean
from tests.conftest import draw_concept

NEW_KEYS = ["clip_i_floor", "clip_i_ceiling", "clip_i_norm", "dino_floor", "dino_ceiling", "dino_norm"]


def test_normalisation_on_hand_made_numbers():
    assert normalised_identity(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert normalised_identity(0.2, 0.2, 0.8) == pytest.approx(0.0)
    assert normalised_identity(0.8, 0.2, 0.8) == pytest.approx(1.0)
    assert normalised_identity(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)  # below the base model
    assert normalised_identity(0.9, -0.2, 0.3) == pytest.approx(2.2)  # above real photos
    for floor, ceiling in [(0.4, 0.4), (0.5, 0.3), (0.3, 0.3 + 1e-5), (float("nan"), 0.5)]:
        assert math.isnan(normalised_identity(0.35, floor, ceiling))


def test_identity_metrics_warn_for_every_undefined_normalised_score():
    bounds = IdentityBounds({"clip_i": 0.6, "dino": 0.1}, {"clip_i": 0.5, "dino": 0.5}, "floor-folder", "star",
                            "leave-one-out over the 5 reference photos")
    metrics = identity_metrics({"clip_i": 0.55, "dino": 0.4}, bounds)
    assert math.isnan(metrics["clip_i_norm"]) and metrics["dino_norm"] == pytest.approx(0.75)
    assert metrics["clip_i_floor"] == 0.6 and metrics["clip_i_ceiling"] == 0.5
    assert metrics["dino_floor"] == 0.1 and metrics["dino_ceiling"] == 0.5
    (warning,) = metrics["identity_warnings"]
    assert "CLIP-I" in warning and "NaN" in warning
    missing = identity_metrics({"clip_i": 0.55, "dino": 0.4}, None, "switched off")
    assert all(math.isnan(missing[key]) for key in NEW_KEYS) and missing["identity_warnings"] == ["switched off"]
    assert missing["ceiling_source"] is None


def test_leave_one_out_ceiling_equals_a_hand_computation():
    same = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # off-diagonal cosines: rows 0 and 1 meet (0, 1/sqrt2), row 2 meets (1/sqrt2, 1/sqrt2)
    r = 1 / 2**0.5
    assert leave_one_out_mean(same, same) == pytest.approx(((0 + r) / 2 + (0 + r) / 2 + (r + r) / 2) / 3)
    # whole photos (candidates) against their masked versions (references): row i never meets reference i
    candidates = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    references = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    # c0 vs r1, r2: 1, 0; c1 vs r0, r2: 1/sqrt2, 1; c2 vs r0, r1: 1, 1/sqrt2
    assert leave_one_out_mean(candidates, references) == pytest.approx(((1 + 0) / 2 + (r + 1) / 2 + (1 + r) / 2) / 3)
    assert math.isnan(leave_one_out_mean(same[:1], same[:1]))


def test_the_ceiling_scores_held_out_photos_or_else_each_reference_against_the_others(spec_for, tiny_clip, tiny_dino,
                                                                                        tmp_path):
    holdout = draw_concept(tmp_path / "holdout", n=3, seed=7)
    spec = spec_for("textual_inversion")
    held = spec.model_copy(update={"concept": spec.concept.model_copy(update={"id": "held", "holdout": str(holdout)})})
    scorers = Scorers(str(tiny_clip), str(tiny_dino))
    references = scorers.features(load_concept_images("blob", spec.concept.images, 0))
    photos = scorers.features(load_concept_images("held", holdout, 0))
    ceiling, source = scorers.ceiling(held)
    assert ceiling["clip_i"] == pytest.approx(pairwise_mean(photos[0], references[0]))
    assert ceiling["dino"] == pytest.approx(pairwise_mean(photos[1], references[1]))
    assert source.startswith("3 held-out photos")
    ceiling, source = scorers.ceiling(spec)
    assert ceiling["dino"] == pytest.approx(leave_one_out_mean(references[1], references[1]))
    assert ceiling["dino"] != pytest.approx(pairwise_mean(references[1], references[1]))  # no photo meets itself
    assert source.startswith("4 reference photos, leave-one-out")


def test_the_floor_is_sampled_once_per_concept_and_shared_by_its_methods(spec_for, tiny_clip, tiny_dino, tmp_path,
                                                                         monkeypatch):
    floor_passes = []
    sample_base_model = evaluation.sample_base_model
    monkeypatch.setattr(evaluation, "sample_base_model", lambda *a, **k: floor_passes.append(1) or sample_base_model(*a, **k))
    runs = [spec_for("textual_inversion"), spec_for("attndreambooth")]
    for spec in runs:
        run_method(spec, progress=False)
    settings = EvaluationSpec(prompts="world_eval", samples=1, scheduler="ddim", steps=2, guidance_scale=5.0, eta=0.0,
                              exclude_tags=["style"], clip=str(tiny_clip), dino=str(tiny_dino), batch_size=4)

    off = evaluate_run(runs[0].run_dir, settings.model_copy(update={"floor_ceiling": False}), progress=False)
    assert all(math.isnan(off.metrics[key]) for key in NEW_KEYS) and "switched off" in off.metrics["identity_warnings"][0]
    assert floor_passes == [] and not (runs[0].run_dir.parent / "_floor").exists()

    def no_resampling(*args, **kwargs):
        raise AssertionError("the run was sampled again")

    with monkeypatch.context() as patch:  # switching the bounds on keeps the run's samples, adds the bounds
        patch.setattr(evaluation, "RunSampler", no_resampling)
        first = evaluate_run(runs[0].run_dir, settings, progress=False)
    assert first.folder == off.folder and floor_passes == [1]
    (floor_dir,) = (runs[0].run_dir.parent / "_floor").iterdir()
    floor = json.loads((floor_dir / "floor.json").read_text())
    floor_scores = pd.DataFrame(json.loads((floor_dir / "scores.json").read_text()))
    assert len(floor_scores) == 12 and all((floor_dir / p).is_file() for p in floor_scores["image"])
    assert floor_scores["prompt"][0] == "a photo of a toy in the snow"  # the class phrase in place of the subject
    identity = floor_scores[~floor_scores["tags"].map(lambda t: "style" in t)]
    assert floor["dino"] == pytest.approx(identity["dino"].mean()) and floor["n_identity_images"] == 12 - 3
    stamp = (floor_dir / "floor.json").stat().st_mtime_ns

    second = evaluate_run(runs[1].run_dir, settings, progress=False)
    assert floor_passes == [1] and (floor_dir / "floor.json").stat().st_mtime_ns == stamp
    references = Scorers(str(tiny_clip), str(tiny_dino)).features(load_concept_images("blob", runs[0].concept.images, 0))
    for result in (first, second):
        metrics = json.loads((result.folder / "metrics.json").read_text())
        assert metrics["floor_folder"] == str(floor_dir)
        assert metrics["clip_i_floor"] == pytest.approx(floor["clip_i"]) and metrics["dino_floor"] == pytest.approx(floor["dino"])
        assert metrics["dino_ceiling"] == pytest.approx(leave_one_out_mean(references[1], references[1]), abs=1e-5)
        assert not math.isnan(metrics["dino_norm"])  # these encoders leave DINO a range (and CLIP-I none)
        for key in ("clip_i", "dino"):
            floor_value, ceiling = metrics[f"{key}_floor"], metrics[f"{key}_ceiling"]
            if ceiling - floor_value >= MIN_IDENTITY_RANGE:
                assert metrics[f"{key}_norm"] == pytest.approx((metrics[key] - floor_value) / (ceiling - floor_value))
            else:
                label = IDENTITY_SCORES[key]
                assert math.isnan(metrics[f"{key}_norm"]) and any(label in w for w in metrics["identity_warnings"])
        assert "Identity between floor and ceiling" in (result.folder / "report.html").read_text()
    assert first.metrics["dino"] != pytest.approx(second.metrics["dino"])  # two runs, one floor

    out = write_comparison([first, second], tmp_path / "cmp")
    comparison = pd.read_csv(out["csv"])
    assert set(NEW_KEYS) <= set(comparison.columns)
    assert comparison["dino_floor"].tolist() == pytest.approx([floor["dino"]] * 2)
    assert "DINO norm" in out["markdown"].read_text()


def test_the_ceiling_source_changes_when_its_photos_do(tmp_path):
    """An evaluation is reused with its ceiling only while the photos it came from are the same."""
    from personalize.identity import ceiling_source
    from personalize.run_settings import ConceptSpec
    from tests.conftest import draw_concept

    holdout = draw_concept(tmp_path / "holdout", n=3)
    concept = ConceptSpec(id="c", images=str(draw_concept(tmp_path / "images", n=3)), super_category="ball", holdout=str(holdout))
    before = ceiling_source(concept)
    assert before.startswith("3 held-out photos") and before == ceiling_source(concept)
    draw_concept(holdout, n=3, seed=5)  # the same names, new pictures
    assert ceiling_source(concept) != before


def test_changed_masks_rescore_the_evaluation_and_floor_from_their_stored_images(spec_for, concept_dir, tiny_clip,
                                                                                   tiny_dino, tmp_path, monkeypatch):
    """Identity is scored against the foreground of the concept's photos: when its masks change, a finished
    evaluation and the concept's floor are scored again from the images they stored, and nothing is sampled."""
    from PIL import Image

    from personalize.scoring import masked_references
    from pipelines.evaluate import add_bounds

    masks = tmp_path / "masks"
    masks.mkdir()
    for photo in sorted(concept_dir.glob("*.png")):
        Image.new("L", Image.open(photo).size, 255).save(masks / photo.name)
    spec = spec_for("textual_inversion", concept={"id": "blob", "images": str(concept_dir), "masks": str(masks),
                                                 "super_category": "toy"})
    run_method(spec, progress=False)
    settings = EvaluationSpec(prompts="world_eval", samples=1, scheduler="ddim", steps=2, guidance_scale=5.0, eta=0.0,
                              clip=str(tiny_clip), dino=str(tiny_dino), batch_size=4)
    before = evaluate_run(spec.run_dir, settings, progress=False)
    floor_dir = before.folder.parents[2] / "_floor"
    (floor_file,) = floor_dir.glob("*/floor.json")
    floor_before = json.loads(floor_file.read_text())
    images = {p.name: p.read_bytes() for p in (before.folder / "images").iterdir()}
    stamp = (before.folder / "metrics.json").stat().st_mtime_ns
    evaluate_run(spec.run_dir, settings, progress=False)
    assert (before.folder / "metrics.json").stat().st_mtime_ns == stamp  # nothing changed: reused as it is

    for photo in sorted(concept_dir.glob("*.png")):  # only the left half of each photo is the subject now
        mask = Image.new("L", Image.open(photo).size, 0)
        mask.paste(255, (0, 0, mask.width // 2, mask.height))
        mask.save(masks / photo.name)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(evaluation, "RunSampler", no_sampling)
    monkeypatch.setattr(evaluation, "sample_base_model", no_sampling)
    after = evaluate_run(spec.run_dir, settings, progress=False)
    assert after.folder == before.folder and after.metrics["references"] != before.metrics["references"]
    assert {p.name: p.read_bytes() for p in (after.folder / "images").iterdir()} == images
    scorers = Scorers(str(tiny_clip), str(tiny_dino))
    reference = scorers.features(masked_references(spec.concept, load_concept_images("blob", str(concept_dir), 0)))
    stored = [Image.open(after.folder / row["image"]).convert("RGB") for row in after.scored]
    expected = scorers.dino.image_features(stored) @ torch.nn.functional.normalize(reference[1].float(), dim=-1).T
    assert [row["dino"] for row in after.scored] == pytest.approx(expected.mean(1).tolist(), abs=1e-5)
    assert [row["clip_t"] for row in after.scored] == [row["clip_t"] for row in before.scored]
    floor_after = json.loads(floor_file.read_text())
    assert floor_after["references"] == after.metrics["references"] and floor_after["dino"] != floor_before["dino"]
    assert after.metrics["dino_floor"] == pytest.approx(floor_after["dino"])

    for photo in sorted(concept_dir.glob("*.png")):  # the batch's evaluation step notices the same
        Image.new("L", Image.open(photo).size, 255).save(masks / photo.name)
    stale = evaluation.finished_evaluation(spec.run_dir, spec, settings)
    rescored = add_bounds({str(spec.run_dir): stale}, settings)[str(spec.run_dir)]
    assert rescored.metrics["references"] == before.metrics["references"]
    assert rescored.metrics["dino"] == pytest.approx(before.metrics["dino"], abs=1e-5)


def test_the_floor_is_found_again_for_photos_moved_elsewhere_and_under_its_earlier_name(spec_for, concept_dir,
                                                                                       tiny_clip, tiny_dino, tmp_path):
    import shutil

    spec = spec_for("textual_inversion")
    settings = EvaluationSpec(prompts="world_eval", samples=1, scheduler="ddim", steps=2, guidance_scale=5.0, eta=0.0,
                              clip=str(tiny_clip), dino=str(tiny_dino))
    folder = evaluation.floor_folder(spec.run_dir, spec, settings)
    moved = spec_for("textual_inversion", concept={"id": "blob", "images": str(shutil.copytree(concept_dir, tmp_path / "moved")),
                                                   "super_category": "toy"})
    assert evaluation.floor_folder(moved.run_dir, moved, settings) == folder
    other_class = spec_for("textual_inversion", concept={"id": "blob", "images": str(concept_dir), "super_category": "cup"})
    assert evaluation.floor_folder(other_class.run_dir, other_class, settings) != folder
    # a floor written when its key named the photos' folder is used as it is
    legacy = folder.with_name(folder.name.rsplit("-", 1)[0] + "-" + evaluation.base_key(spec, located=True))
    assert legacy != folder
    legacy.mkdir(parents=True)
    assert evaluation.floor_folder(spec.run_dir, spec, settings) == legacy


def test_scorers_keep_the_references_of_two_concepts_of_one_id_apart(spec_for, tiny_clip, tiny_dino, tmp_path):
    """`personalize evaluate` over two batches may meet one concept id with other photos in each."""
    first = spec_for("textual_inversion")
    other = spec_for("textual_inversion", concept={"id": "blob", "images": str(draw_concept(tmp_path / "other", seed=9)),
                                                   "super_category": "toy"})
    scorers = Scorers(str(tiny_clip), str(tiny_dino))
    a, b = scorers.reference(first), scorers.reference(other)
    fresh = Scorers(str(tiny_clip), str(tiny_dino)).reference(other)
    assert not torch.allclose(a[1], b[1]) and torch.allclose(b[1], fresh[1])
    assert scorers.ceiling(first) != scorers.ceiling(other)
