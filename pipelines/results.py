"""The batch's results table: one row per (concept, method) with status, reason, stage durations, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

IDENTITY_BOUNDS = ["clip_i_floor", "clip_i_ceiling", "clip_i_norm", "dino_floor", "dino_ceiling", "dino_norm"]
COLUMNS = ["concept", "method", "status", "reason", "train_seconds", "stage_seconds", "clip_t", "clip_i", "dino",
           *IDENTITY_BOUNDS, "run_dir", "report", "node"]  # node: the Ray node id that finished the run


def results_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["concept", "method"]).reset_index(drop=True)


def to_markdown(frame: pd.DataFrame) -> str:
    lines = ["| concept | method | status | stages (s) | CLIP-T | CLIP-I | DINO | identity CLIP-I / DINO (0 floor, 1 ceiling) | reason |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in frame.itertuples():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in json.loads(r.stage_seconds or "{}").items())
        metric = lambda v: "" if pd.isna(v) else f"{v:.4f}"  # noqa: E731
        reason = (r.reason or "").replace("|", "/").replace("\n", " ")
        normalised = "" if pd.isna(r.clip_i_norm) and pd.isna(r.dino_norm) else f"{r.clip_i_norm:.2f} / {r.dino_norm:.2f}"
        lines.append(f"| {r.concept} | {r.method} | {r.status} | {stages} | {metric(r.clip_t)} | {metric(r.clip_i)} | "
                     f"{metric(r.dino)} | {normalised} | {reason} |")
    return "\n".join(lines) + "\n"


def write_results(frame: pd.DataFrame, folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": folder / "results.parquet", "markdown": folder / "results.md"}
    frame.to_parquet(paths["parquet"], index=False)
    paths["markdown"].write_text(to_markdown(frame))
    return paths
