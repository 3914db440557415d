"""The quality benchmark: a smoke run through `personalize batch` (local Ray) gives the table with every column and
the claims table; the bootstrap intervals and claim verdicts are pinned on hand-made numbers."""

import math
from pathlib import Path

import pandas as pd
import pytest

from microworld.claims import bootstrap_interval, claims_table, paired_difference, verdict
from microworld.quality import Setting, run, write_report


def test_quality_benchmark_smoke(tmp_path, local_ray):
    setting = Setting.smoke(["textual_inversion", "core"])  # the pair batch (DisenDiff) is the same path on another concept
    frame, separation = run(tmp_path / "work", setting)
    assert sorted(frame["method"]) == ["core", "core+tto", "textual_inversion"]
    share = frame.set_index("method")["placeholder_attention"]
    assert 0 < share["textual_inversion"] < 1 and 0 < share["core"] < 1 and pd.isna(share["core+tto"])
    assert separation.empty  # no run on the two-subject photo
    # the base model's CLIP-T on the same prompts: one floor per concept, shared by every method
    assert frame["clip_t_base"].nunique() == 1 and frame["clip_t_base"].between(-1, 1).all()
    assert frame["clip_t_ratio"].between(0.2, 5).all()
    assert set(frame["status"]) == {"finished"}
    steps = frame.set_index("method")["steps"]
    assert steps["core+tto"] == steps["core"] and steps["textual_inversion"] >= 1  # the trained steps, TTO or not
    paths = write_report(frame, setting, tmp_path / "docs", minutes=1.0, separation=separation, work=tmp_path / "work")
    published = pd.read_csv(paths["runs"])  # run paths relative to the work folder, not this machine's
    assert published["run_dir"].tolist() == [str(Path(d).relative_to((tmp_path / "work").resolve())) for d in frame["run_dir"]]
    assert published["report"].str.startswith("seed-0/single/runs/").all()
    table = pd.read_csv(paths["csv"])
    for metric in ("clip_t", "clip_i_norm", "dino_norm", "placeholder_attention"):
        assert {metric, f"{metric}_low", f"{metric}_high"} <= set(table.columns)
    assert table["clip_t"].notna().all()
    assert frame[["clip_i_floor", "clip_i_ceiling", "dino_floor", "dino_ceiling"]].notna().all().all()
    text = paths["markdown"].read_text()
    assert "| textual_inversion |" in text and "| core+tto |" in text and "## The papers' claims" in text
    assert paths["scatter"].stat().st_size > 10_000


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_data():
    mean, low, high = bootstrap_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and 1.0 <= low < 2.5 < high <= 4.0
    _, low_many, high_many = bootstrap_interval([1.0, 2.0, 3.0, 4.0] * 25)
    assert high_many - low_many < (high - low) / 3
    single = bootstrap_interval([0.7])
    assert single[0] == 0.7 and math.isnan(single[1]) and math.isnan(single[2]) and verdict(*single[1:]) == "inconclusive"
    assert all(math.isnan(v) for v in bootstrap_interval([float("nan")]))


def runs(method: str, values: dict[str, float], seconds: float = 10.0) -> list[dict]:
    return [{"method": method, "concept": c, "seed": 0, "clip_t": v, "clip_i_norm": v, "dino_norm": v,
             "train_seconds": seconds} for c, v in values.items()]


def test_claims_compare_paired_runs_and_read_the_interval():
    # DreamBooth beats TI on every concept by 0.3: holds, whatever the concepts' own levels.
    frame = pd.DataFrame(runs("dreambooth", {"a": 0.9, "b": 0.4, "c": 0.6}) + runs("textual_inversion", {"a": 0.6, "b": 0.1, "c": 0.3})
                         + runs("rare_two_stage", {"a": 0.2, "b": 0.9, "c": 0.3}, seconds=5.0))
    mean, low, high, pairs = paired_difference(frame, "dreambooth", "textual_inversion", "clip_i_norm")
    assert (mean, low, high, pairs) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3), 3)
    rows = {r["claim"]: r for r in claims_table(frame)}
    assert rows["DreamBooth above Textual Inversion in identity"]["verdict"] == "holds"
    assert rows['"(rare)" above DreamBooth in text alignment and identity']["verdict"] == "inconclusive"  # -0.7, +0.5, -0.3
    assert rows['"(rare)" trains in less time than DreamBooth']["verdict"] == "holds"
    assert rows["CoRe above AttnDreamBooth in text alignment and identity"]["evidence"] == "core or attndreambooth not run"
    # two methods not run (AttnDreamBooth, CoRe), attention shares and two-subject runs not measured
    assert sum(r["verdict"] == "not tested" for r in rows.values()) == 5
    attention = rows[next(c for c in rows if c.startswith("Textual Inversion overfits"))]
    assert attention["evidence"] == "placeholder_attention not measured by this run of the benchmark"
    assert verdict(-0.2, -0.1) == "fails" and verdict(-0.1, 0.1) == "inconclusive" and verdict(0.1, 0.2) == "holds"


def test_the_report_replaces_its_results_and_keeps_the_analysis(tmp_path):
    from microworld.quality import with_generated_section

    path = tmp_path / "quality.md"
    path.write_text(with_generated_section(path, "table one\n"))
    path.write_text(path.read_text() + "\n# Analysis\nwritten by hand\n")
    text = with_generated_section(path, "table two\n")
    assert "table two" in text and "table one" not in text and text.endswith("end of results -->\n\n# Analysis\nwritten by hand\n")


def test_the_attention_and_two_subject_claims_read_their_own_measurements():
    frame = pd.DataFrame(runs("dreambooth", {"a": 0.9, "b": 0.4}) + runs("textual_inversion", {"a": 0.6, "b": 0.1}))
    frame["placeholder_attention"] = [0.10, 0.20, 0.45, 0.40]  # TI's token takes 0.35 and 0.20 more
    separation = pd.DataFrame([
        {"method": m, "concept": f"pair/{s}", "seed": seed, "separation_clip_i": v, "separation_dino": w}
        for m, seed, s, v, w in [("disendiff", 0, "x", 0.10, 0.05), ("disendiff", 0, "y", 0.12, 0.02),
                                 ("disendiff", 1, "x", 0.20, 0.00), ("disendiff", 1, "y", 0.10, 0.04),
                                 ("custom_diffusion (two subjects)", 0, "x", 0.02, 0.06), ("custom_diffusion (two subjects)", 0, "y", 0.03, 0.03),
                                 ("custom_diffusion (two subjects)", 1, "x", 0.05, 0.03), ("custom_diffusion (two subjects)", 1, "y", 0.05, 0.03)]])
    rows = {r["claim"].split(":")[0].split(" (")[0]: r for r in claims_table(frame, separation)}
    attention = rows["Textual Inversion overfits the embedding"]
    assert attention["verdict"] == "holds" and attention["evidence"].startswith("placeholder_attention: +0.275")
    pair = rows["DisenDiff keeps two subjects of one image apart better than Custom Diffusion"]
    # a run's subjects are averaged first (pairs are runs, not subjects): CLIP-I +0.085 and +0.10 higher, the
    # encoder's -0.01 lower on both: not both metrics, so it fails
    assert pair["verdict"] == "fails" and "separation_clip_i: +0.092 [+0.085, +0.100] over 2 pairs" in pair["evidence"]
    assert pair["evidence"].endswith("separation_dino: -0.010 [-0.010, -0.010] over 2 pairs")

    frame.loc[frame["method"] == "dreambooth", "placeholder_attention"] = float("nan")  # measured for one side only
    attention = next(r for r in claims_table(frame) if r["claim"].startswith("Textual Inversion overfits"))
    assert attention["verdict"] == "not tested"


def test_the_default_setting_runs_the_papers_methods_and_trains_the_pair_baseline_beside_disendiff():
    from microworld.quality import PAIR_BASELINE, PAPER_METHODS, pair_methods
    from personalize.config import available_methods

    assert set(PAPER_METHODS) <= set(available_methods()) and not any(m.endswith("_lora") for m in PAPER_METHODS)
    assert Setting().methods == PAPER_METHODS and len(PAPER_METHODS) == 7
    assert pair_methods(PAPER_METHODS) == ["disendiff", PAIR_BASELINE]
    assert pair_methods(["disendiff"]) == ["disendiff"] and pair_methods(["custom_diffusion"]) == []
