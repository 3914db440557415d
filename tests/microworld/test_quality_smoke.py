"""A smoke run of the quality benchmark: 1 concept x 2 methods x a few steps gives the table with every column."""

import pandas as pd

from microworld.quality import Setting, run, write_report


def test_quality_benchmark_smoke(tmp_path):
    setting = Setting.smoke(["textual_inversion", "disendiff"])
    frame = run(tmp_path / "work", setting, progress=False)
    assert list(frame["method"]) == ["textual_inversion", "disendiff"]
    paths = write_report(frame, setting, tmp_path / "docs", minutes=1.0)
    table = pd.read_csv(paths["csv"])
    assert list(table.columns) == ["method", "clip_t_mean", "clip_t_std", "clip_i_mean", "clip_i_std", "identity_mean",
                                   "identity_std", "runs", "steps", "train_seconds"]
    assert table[["clip_t_mean", "clip_i_mean", "identity_mean"]].notna().all().all()
    text = paths["markdown"].read_text()
    assert "| textual_inversion |" in text and "| disendiff |" in text and "Raw cosines" in text
    assert paths["scatter"].stat().st_size > 10_000
