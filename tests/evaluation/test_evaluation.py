"""Evaluation: CLIP-T prompts, tag exclusion, deterministic sampling, and `personalize evaluate` end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from personalize.cli import main
from personalize.loop import run_method
from personalize.run_settings import EvaluationSpec
from personalize.sampling import LoadedRun, generate
from personalize.scoring import aggregate, clip_text, eval_rows


def test_clip_text_removes_or_replaces_the_placeholder_exactly():
    # CoRe / TI name the subject by the placeholder alone; AttnDreamBooth / DreamBooth add the class word
    assert clip_text("a {} on the beach", "<dog7>", ["<dog7>"], "dog", "remove") == "a on the beach"
    assert clip_text("a {} on the beach", "<dog7>", ["<dog7>"], "dog", "replace") == "a dog on the beach"
    assert clip_text("a {} on the beach", "sks dog", ["sks"], "dog", "remove") == "a dog on the beach"
    assert clip_text("a red {}", "<v> <v>_1 dog", ["<v> <v>_1"], "dog", "remove") == "a red dog"
    assert clip_text("a {} on the beach", "sks dog", ["sks"], "dog", "replace") == "a dog on the beach"
    assert clip_text("photo of {}", "<p-1> cat and <p-2> dog", ["<p-1>", "<p-2>"], "cat and dog", "remove") == "photo of cat and dog"


def test_identity_metrics_exclude_exactly_the_tagged_prompts():
    rows = [
        {"tags": ["background"], "clip_t": 0.2, "clip_i": 0.8, "dino": 0.6},
        {"tags": ["style"], "clip_t": 0.4, "clip_i": 0.2, "dino": 0.1},
        {"tags": ["outfit", "colour"], "clip_t": 0.3, "clip_i": 0.3, "dino": 0.2},
        {"tags": [], "clip_t": 0.1, "clip_i": 0.6, "dino": 0.4},
    ]
    everything = aggregate(rows, [])
    assert everything["clip_i"] == pytest.approx((0.8 + 0.2 + 0.3 + 0.6) / 4)
    core_style = aggregate(rows, ["style", "outfit"])
    assert core_style["clip_i"] == pytest.approx((0.8 + 0.6) / 2) and core_style["dino"] == pytest.approx(0.5)
    assert core_style["clip_t"] == pytest.approx(0.25)  # text alignment keeps every prompt
    assert core_style["n_identity_images"] == 2 and core_style["scale"] == "raw cosine"


def test_rows_follow_the_prompt_set_and_the_concept_kind(spec_for):
    spec = spec_for("core")
    rows = eval_rows(spec, "<blob>", ["<blob>"], EvaluationSpec(samples=2, seed=5))
    assert len(rows) == 25 * 2 and rows[0].seed == 5 and rows[1].seed == 6
    assert rows[0].prompt == "a <blob> in the jungle" and rows[0].text == "a in the jungle"
    live = spec.model_copy(update={"concept": spec.concept.model_copy(update={"kind": "animate"})})
    assert any("wearing a santa hat" in r.prompt for r in eval_rows(live, "<blob>", ["<blob>"], EvaluationSpec(samples=1)))


def test_sampling_is_deterministic_per_seed_and_differs_across_seeds(spec_for):
    spec = spec_for("textual_inversion")
    run_method(spec, progress=False)
    pipe = LoadedRun(spec.run_dir).pipeline("ddim")
    a = generate(pipe, ["a photo of a <blob>"] * 2, [3, 4], 64, steps=3)
    again = generate(pipe, ["a photo of a <blob>"] * 2, [3, 4], 64, steps=3)
    assert [list(i.getdata()) for i in a] == [list(i.getdata()) for i in again]
    assert list(a[0].getdata()) != list(a[1].getdata())
    single = generate(pipe, ["a photo of a <blob>"] * 2, [3, 4], 64, steps=3, batch_size=1)  # noise per image seed
    for x, y in zip(a, single):
        assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 2  # float rounding only


def test_a_stochastic_sampler_draws_every_steps_noise_from_the_images_seed(spec_for):
    """DDIM with eta 1 (Custom Diffusion's and DisenDiff's class priors) adds fresh noise at every step: from each
    image's seed, not from torch's global generator, whose state depends on whatever ran before."""
    spec = spec_for("textual_inversion")
    run_method(spec, progress=False)
    pipe = LoadedRun(spec.run_dir).pipeline("ddim")
    prompts = ["a photo of a <blob>"] * 2
    a = generate(pipe, prompts, [3, 4], 64, steps=3, eta=1.0)
    torch.manual_seed(1234)  # another state of the global generator
    again = generate(pipe, prompts, [3, 4], 64, steps=3, eta=1.0)
    assert [list(i.getdata()) for i in a] == [list(i.getdata()) for i in again]
    single = generate(pipe, prompts[:1], [4], 64, steps=3, eta=1.0, batch_size=1)[0]
    assert np.abs(np.asarray(a[1], dtype=int) - np.asarray(single, dtype=int)).max() <= 2  # float rounding only
    deterministic = generate(pipe, prompts[:1], [3], 64, steps=3, eta=0.0)[0]
    assert np.abs(np.asarray(a[0], dtype=int) - np.asarray(deterministic, dtype=int)).max() > 2  # eta 1 added noise


def test_personalize_evaluate_writes_scores_aggregates_and_reports(spec_for, tiny_clip, tiny_dino, tmp_path):
    runs = [spec_for("textual_inversion"), spec_for("attndreambooth")]
    for spec in runs:
        run_method(spec, progress=False)
    out = tmp_path / "cmp"
    args = [str(runs[0].output_dir), "--prompts", "personalize_eval", "--samples", "2", "--steps", "2",
            "--clip", str(tiny_clip), "--dino", str(tiny_dino), "--exclude-tags", "style", "outfit", "--out", str(out)]
    assert main(["evaluate", *args]) == 0
    for spec in runs:
        (folder,) = (spec.run_dir / "eval").iterdir()
        scores = pd.read_csv(folder / "scores.csv")
        assert list(scores.columns) == ["prompt_index", "prompt", "text", "tags", "seed", "clip_t", "clip_i", "dino", "image"]
        assert len(scores) == 24 * 2 and scores["seed"].tolist()[:2] == [0, 1]
        assert all((folder / p).is_file() for p in scores["image"])
        assert pd.read_parquet(folder / "scores.parquet").shape == scores.shape
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["scale"] == "raw cosine" and metrics["n_images"] == 48 and metrics["n_identity_images"] == 48 - 2 * 9
        identity = scores[~scores["tags"].fillna("").str.contains("style|outfit")]
        assert metrics["dino"] == pytest.approx(identity["dino"].mean())
        assert metrics["steps"] == 2 and metrics["method"] == spec.method.name
        assert len(list((folder / "grids").glob("*.png"))) == 24
        report = (folder / "report.html").read_text()
        assert "raw cosine" in report and "grids/p00.png" in report
    assert "stage-02-subject_identity.png" in (next((runs[1].run_dir / "eval").iterdir()) / "report.html").read_text()
    comparison = pd.read_csv(out / "comparison.csv")
    assert sorted(comparison["method"]) == ["attndreambooth", "textual_inversion"]
    with Image.open(out / "scatter.png") as im:
        assert im.size[0] > 600
    stamp = (folder / "metrics.json").stat().st_mtime_ns
    assert main(["evaluate", *args]) == 0  # same settings: reused, not recomputed
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp
