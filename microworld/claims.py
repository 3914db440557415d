"""Per-method summaries with 95 % bootstrap intervals, and the papers' claims tested against them.

Intervals resample runs (concept x seed) with replacement. A claim "A above B" compares the two methods on the
runs they share (same concept and seed), so a hard concept does not count against one method only: it holds when
the interval of the mean paired difference lies above zero, fails when it lies below, and is inconclusive when it
contains zero.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

METRICS = ("clip_t", "clip_i_norm", "dino_norm", "clip_i", "dino", "placeholder_attention", "clip_t_ratio")
RESAMPLES = 2000


def bootstrap_interval(values, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval of the mean; NaN values are left out. One value has no interval
    (its bounds are NaN, so no claim rests on a single run); none gives (nan, nan, nan)."""
    data = np.asarray([v for v in values if v == v], dtype=float)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    if data.size == 1:
        return float(data[0]), math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(data.mean()), float(low), float(high)


def method_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per method: each metric's mean with its interval, the run count and mean training seconds."""
    rows = []
    for method, part in frame.groupby("method"):
        row = {"method": method, "runs": len(part), "train_seconds": round(float(part["train_seconds"].mean()), 1)}
        if "steps" in part:
            row["steps"] = int(part["steps"].iloc[0])
        for metric in METRICS:  # a table from before a metric existed has no column for it
            values = part[metric] if metric in part else []
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = bootstrap_interval(values)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(frame: pd.DataFrame, a: str, b: str, metric: str) -> tuple[float, float, float, int]:
    """Mean of (a - b) over the concept x seed pairs both methods ran, with its interval and the pair count."""
    keys = ["concept", "seed"]
    left = frame[frame["method"] == a].set_index(keys)[metric]
    right = frame[frame["method"] == b].set_index(keys)[metric]
    diffs = (left - right).dropna()
    return (*bootstrap_interval(diffs.tolist()), len(diffs))


def verdict(low: float, high: float) -> str:
    if low != low or high != high:
        return "inconclusive"
    return "holds" if low > 0 else "fails" if high < 0 else "inconclusive"


def _both(*verdicts: str) -> str:
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "fails" if any(v == "fails" for v in verdicts) else "inconclusive"


CLAIMS = (  # (claim, source, a, b, metrics that must all be higher for a)
    ("DreamBooth above Textual Inversion in identity", "seed 000 / 002 baselines", "dreambooth", "textual_inversion",
     ("clip_i_norm",)),
    ("AttnDreamBooth above DreamBooth in text alignment", "seed 000", "attndreambooth", "dreambooth", ("clip_t",)),
    ("CoRe above AttnDreamBooth in text alignment and identity", "seed 001, Table 1", "core", "attndreambooth",
     ("clip_t", "clip_i_norm")),
    ('"(rare)" above DreamBooth in text alignment and identity', "seed 002", "rare_two_stage", "dreambooth",
     ("clip_t", "clip_i_norm")),
    ("CoRe's test-time optimisation raises CLIP-T", "seed 001", "core+tto", "core", ("clip_t",)),
    ("Textual Inversion overfits the embedding: its token takes more of the prompt's attention than DreamBooth's, "
     "leaving less to the context words", "seed 000", "textual_inversion", "dreambooth", ("placeholder_attention",)),
)
# DisenDiff's baseline trained on the same two-subject photo; its rows carry the label apart from its own runs
PAIR_BASELINE = "custom_diffusion"
PAIR_LABEL = " (two subjects)"
SEPARATION_CLAIM = ("DisenDiff keeps two subjects of one image apart better than Custom Diffusion (each subject "
                    "prompted alone: identity against its own photos minus against the other's)", "seed 003",
                    "disendiff", PAIR_BASELINE + PAIR_LABEL, ("separation_clip_i", "separation_dino"))


def compare(frame: pd.DataFrame | None, claim: str, source: str, a: str, b: str, metrics) -> dict:
    """One claim row: "a above b" in every metric, on the runs both methods share."""
    if frame is None or frame.empty or not ({a, b} <= set(frame["method"])):
        return {"claim": claim, "source": source, "verdict": "not tested", "evidence": f"{a} or {b} not run"}
    both = frame[frame["method"].isin([a, b])]
    missing = [m for m in metrics if m not in both or both.groupby("method")[m].count().min() == 0]
    if missing:
        return {"claim": claim, "source": source, "verdict": "not tested",
                "evidence": f"{', '.join(missing)} not measured by this run of the benchmark"}
    verdicts, evidence = [], []
    for metric in metrics:
        mean, low, high, pairs = paired_difference(frame, a, b, metric)
        verdicts.append(verdict(low, high))
        evidence.append(f"{metric}: {mean:+.3f} [{low:+.3f}, {high:+.3f}] over {pairs} pairs")
    return {"claim": claim, "source": source, "verdict": _both(*verdicts), "evidence": "; ".join(evidence)}


def claims_table(frame: pd.DataFrame, separation: pd.DataFrame | None = None) -> list[dict]:
    """Every claim's row; `separation` holds the two-subject runs' rows, one per (run, subject)."""
    rows = [compare(frame, *claim) for claim in CLAIMS]
    if {"rare_two_stage", "dreambooth"} <= set(frame["method"]):
        mean, low, high, pairs = paired_difference(frame, "dreambooth", "rare_two_stage", "train_seconds")
        rows.append({"claim": '"(rare)" trains in less time than DreamBooth', "source": "seed 002",
                     "verdict": verdict(low, high), "evidence": f"DreamBooth - (rare) seconds: {mean:+.1f} [{low:+.1f}, {high:+.1f}] over {pairs} pairs"})
    rows.append(compare(separation_per_run(separation), *SEPARATION_CLAIM))
    return rows


def separation_per_run(separation: pd.DataFrame | None) -> pd.DataFrame | None:
    """One row per run (its subjects averaged): the subjects of one run are not independent samples."""
    if separation is None or separation.empty:
        return separation
    runs = separation.assign(concept=separation["concept"].str.split("/").str[0])
    return runs.groupby(["method", "concept", "seed"], as_index=False).mean(numeric_only=True)


def separation_markdown(separation: pd.DataFrame | None) -> str:
    """Per method trained on the two-subject photo: each subject prompted alone, scored against its own photos and
    the other subject's (means over runs x subjects with their intervals)."""
    if separation is None or separation.empty:
        return ""
    lines = ["Two subjects from one photo, each prompted alone (rows: runs x subjects):", "",
             "| method | CLIP-I own | CLIP-I other | separation, CLIP-I | encoder own | encoder other | separation, encoder | rows |",
             "|---|---|---|---|---|---|---|---|"]
    for method, part in separation.groupby("method"):
        cells = []
        for metric in ("clip_i_own", "clip_i_other", "separation_clip_i", "dino_own", "dino_other", "separation_dino"):
            mean, low, high = bootstrap_interval(part[metric])
            cells.append(f"{mean:.3f}" + ("" if low != low else f" [{low:.3f}, {high:.3f}]"))
        lines.append(f"| {method} | {' | '.join(cells)} | {len(part)} |")
    return "\n".join(lines) + "\n"


def claims_markdown(frame: pd.DataFrame, separation: pd.DataFrame | None = None) -> str:
    lines = ["## The papers' claims", "",
             "Each row compares the two methods on the runs they share (same concept and seed): the mean paired "
             "difference and its 95 % bootstrap interval. Holds: the interval is above zero; fails: below; "
             "inconclusive: it contains zero.", "", "| claim | source | verdict | evidence |", "|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['source']} | **{r['verdict']}** | {r['evidence']} |" for r in claims_table(frame, separation)]
    return "\n".join(lines) + "\n"


def _cell(row, metric: str, digits: int = 3) -> str:
    mean, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
    if mean != mean:
        return "n/a"
    if low != low:
        return f"{mean:.{digits}f} (one run)"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def summary_markdown(table: pd.DataFrame, frame: pd.DataFrame, setting, minutes: float) -> str:
    lines = ["| method | CLIP-T | identity, CLIP-I (0 floor, 1 ceiling) | identity, encoder (0 floor, 1 ceiling) | "
             "CLIP-T / base model's | CLIP-I raw | identity encoder raw | placeholder attention | runs | steps | train s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['method']} | {_cell(row, 'clip_t')} | {_cell(row, 'clip_i_norm', 2)} | {_cell(row, 'dino_norm', 2)} | "
                     f"{_cell(row, 'clip_t_ratio', 2)} | {_cell(row, 'clip_i')} | {_cell(row, 'dino')} | {_cell(row, 'placeholder_attention', 2)} | "
                     f"{int(row['runs'])} | {int(row.get('steps', 0))} | "
                     f"{row['train_seconds']} |")
    bounds = frame.groupby("concept")[["clip_i_floor", "clip_i_ceiling", "dino_floor", "dino_ceiling"]].first()
    lines += ["", "Mean and 95 % bootstrap interval over runs (concepts x seeds; DisenDiff: one two-subject photo x "
              f"seeds; Custom Diffusion (two subjects): the same photo, one modifier per subject). {setting.samples} "
              f"image(s) per prompt of `world_eval`, DDIM {setting.eval_steps} steps, guidance 5. Placeholder attention: "
              "the share of the prompt's word attention on the placeholder's tokens (personalize/attention_share.py). CLIP-T / "
              "base model's: each run's CLIP-T over the base model's on the same prompts and seeds asked for the class "
              "(the floor's samples). "
              "Stage lengths relative to the model-scaled recipes: "
              + ", ".join(f"{m} x{s:g}" for m, s in setting.scales.items() if m in setting.methods)
              + (f"; {setting.class_images} class-prior images per set." if setting.class_images else "."),
              f"Wall time: {minutes:.1f} min.", "", "Floor (the base model asked for the class) and ceiling (held-out photos) "
              "per concept:", "", "| concept | CLIP-I floor | CLIP-I ceiling | encoder floor | encoder ceiling |",
              "|---|---|---|---|---|"]
    for concept, b in bounds.iterrows():
        lines.append(f"| {concept} | {b['clip_i_floor']:.3f} | {b['clip_i_ceiling']:.3f} | {b['dino_floor']:.3f} | "
                     f"{b['dino_ceiling']:.3f} |")
    return "\n".join(lines) + "\n"


def _spread(row, metric: str) -> list[list[float]]:
    """Error-bar lengths below and above the mean (none for a single run)."""
    low, high = row[f"{metric}_low"], row[f"{metric}_high"]
    return [[row[metric] - low if low == low else 0.0], [high - row[metric] if high == high else 0.0]]


def tradeoff_plot(table: pd.DataFrame, frame: pd.DataFrame, path) -> None:
    """CLIP-T (x) against normalised identity (y): runs as dots, method means with their 95 % intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = plt.get_cmap("tab10")
    for ax, metric, label in zip(axes, ("clip_i_norm", "dino_norm"), ("CLIP-I", "identity encoder")):
        for k, row in table.reset_index(drop=True).iterrows():
            part = frame[frame["method"] == row["method"]]
            ax.scatter(part["clip_t"], part[metric], color=colours(k % 10), alpha=0.35, s=22)
            ax.errorbar(row["clip_t"], row[metric], xerr=_spread(row, "clip_t"), yerr=_spread(row, metric),
                        fmt="X", ms=10, color=colours(k % 10), mec="black", capsize=3, label=row["method"])
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("CLIP-T (world CLIP): text alignment")
        ax.set_ylabel(f"identity, {label}: 0 floor, 1 ceiling")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("text alignment vs normalised identity (dots: runs; crosses: method means, bars: 95 % bootstrap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
