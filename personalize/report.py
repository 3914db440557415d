"""Evaluation reports people can read: per-image scores, grids per prompt, heat maps, HTML; and, for several
runs, a comparison table with a text-alignment vs identity scatter plot."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import pandas as pd
from PIL import Image

from personalize.metrics import SCALE
from personalize.sampling import image_grid

SCORE_COLUMNS = ["prompt_index", "prompt", "text", "tags", "seed", "clip_t", "clip_i", "dino", "image"]
IDENTITY_COLUMNS = ["clip_i_floor", "clip_i_ceiling", "clip_i_norm", "dino_floor", "dino_ceiling", "dino_norm"]


def write_scores(folder: Path, scored: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(scored)[SCORE_COLUMNS]
    frame["tags"] = frame["tags"].map(lambda t: ",".join(t))
    frame.to_csv(folder / "scores.csv", index=False)
    frame.to_parquet(folder / "scores.parquet", index=False)
    (folder / "scores.json").write_text(json.dumps(scored, indent=1))
    return frame


def write_run_report(folder: Path, run_dir: Path, metrics: dict, scored: list[dict], images: list[Image.Image],
                     references: list[Image.Image] | None = None) -> None:
    write_scores(folder, scored)
    reference_html = "<p>none</p>"
    if references:
        side = images[0].size[0] if images else 128
        image_grid([r.convert("RGB").resize((side, side)) for r in references], len(references)).save(folder / "references.png")
        reference_html = "<p><img src='references.png' class='grid'></p>"
    (folder / "grids").mkdir(exist_ok=True)
    prompts: dict[int, list[int]] = {}
    for i, row in enumerate(scored):
        prompts.setdefault(row["prompt_index"], []).append(i)
    sections = []
    for index, members in sorted(prompts.items()):
        grid = f"grids/p{index:02d}.png"
        image_grid([images[i] for i in members], len(members)).save(folder / grid)
        rows = [scored[i] for i in members]
        means = {k: sum(r[k] for r in rows) / len(rows) for k in ("clip_t", "clip_i", "dino")}
        tags = ", ".join(rows[0]["tags"]) or "-"
        sections.append(
            f"<h3>{html.escape(rows[0]['prompt'])}</h3><p>tags: {html.escape(tags)} &middot; CLIP-T {means['clip_t']:.4f} "
            f"&middot; CLIP-I {means['clip_i']:.4f} &middot; DINO {means['dino']:.4f}</p><img src='{grid}' class='grid'>"
        )
    overview = [images[members[0]] for _, members in sorted(prompts.items())]
    image_grid(overview, min(6, len(overview)), None).save(folder / "overview.png")
    heatmaps = sorted((run_dir / "attention").glob("*.png")) if (run_dir / "attention").is_dir() else []
    heat_html = "".join(f"<p><img src='{os.path.relpath(p, folder)}'></p>" for p in heatmaps) or "<p>none</p>"
    table = "".join(f"<tr><td>{k}</td><td>{_fmt(v)}</td></tr>" for k, v in metrics.items())
    identity_html = identity_section(folder, metrics)
    (folder / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(metrics['concept'])} / "
        f"{html.escape(metrics['method'])}</title><style>body{{font-family:sans-serif;margin:2em}} img.grid{{image-rendering:pixelated;"
        f"height:128px}} td{{padding:2px 10px}}</style></head><body><h1>{html.escape(metrics['concept'])} &mdash; "
        f"{html.escape(metrics['method'])}</h1><p>Scores are {SCALE}s. CLIP-T: image vs prompt text; CLIP-I and DINO: mean "
        f"over all generated x real image pairs.</p><table>{table}</table>{identity_html}<h2>Reference photos</h2>{reference_html}"
        f"<h2>Attention heat maps</h2>{heat_html}"
        f"<h2>Samples</h2>{''.join(sections)}</body></html>"
    )
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))  # last: marks the folder complete


def identity_section(folder: Path, metrics: dict) -> str:
    """CLIP-I and DINO between their floor and ceiling: the numbers, where the bounds come from, the floor's images
    and any warning (a normalised score left undefined)."""
    rows = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{_fmt(metrics.get(key + suffix, float('nan')))}</td>"
                                          for suffix in ("", "_floor", "_ceiling", "_norm")) + "</tr>"
        for key, label in (("clip_i", "CLIP-I"), ("dino", "DINO")))
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in metrics.get("identity_warnings", []))
    floor = metrics.get("floor_folder")
    sources = "<p>Floor and ceiling not computed.</p>"
    if floor:
        grid = os.path.relpath(Path(floor) / "grid.png", folder)
        sources = (f"<p>Floor: the base model, no personalisation, asked for &ldquo;{html.escape(metrics['floor_subject'])}"
                   f"&rdquo; in place of the subject on the same prompts and seeds (<code>{html.escape(floor)}</code>). "
                   f"Ceiling: {html.escape(metrics['ceiling_source'])}, scored against the reference photos. "
                   f"Normalised = (score - floor) / (ceiling - floor): 0 is the base model's level, 1 real photos'.</p>"
                   f"<p><img src='{grid}' class='grid'></p>")
    return (f"<h2>Identity between floor and ceiling</h2><table><tr><th></th><th>score</th><th>floor</th><th>ceiling</th>"
            f"<th>normalised</th></tr>{rows}</table>{sources}" + (f"<ul>{warnings}</ul>" if warnings else ""))


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def comparison_frame(evaluations) -> pd.DataFrame:
    rows = [{"concept": e.metrics["concept"], "method": e.metrics["method"], "clip_t": e.metrics["clip_t"],
             "clip_i": e.metrics["clip_i"], "dino": e.metrics["dino"],
             **{key: e.metrics.get(key, float("nan")) for key in IDENTITY_COLUMNS}, "n_images": e.metrics["n_images"],
             "report": str(e.folder / "report.html")} for e in evaluations]
    return pd.DataFrame(rows).sort_values(["concept", "method"]).reset_index(drop=True)


def scatter_plot(frame: pd.DataFrame, path: Path, identity: tuple[str, ...] = ("clip_i", "dino"),
                 labels: dict[str, str] | None = None) -> Path:
    """CLIP-T (x) against each identity score (y), one point per run, coloured by method; method means marked."""
    names = {"clip_i": "CLIP-I", "dino": "DINO", **(labels or {})}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(identity), figsize=(5.5 * len(identity), 4.5), squeeze=False)
    methods = sorted(frame["method"].unique())
    colours = plt.get_cmap("tab10")
    for ax, metric in zip(axes[0], identity):
        for k, method in enumerate(methods):
            part = frame[frame["method"] == method]
            ax.scatter(part["clip_t"], part[metric], color=colours(k % 10), alpha=0.6, s=28, label=method)
            ax.scatter(part["clip_t"].mean(), part[metric].mean(), color=colours(k % 10), marker="X", s=140,
                       edgecolor="black")
        ax.set_xlabel(f"CLIP-T ({SCALE}): text alignment")
        ax.set_ylabel(f"{names.get(metric, metric)} ({SCALE}): identity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="best")
    fig.suptitle("text alignment vs identity (dots: runs, crosses: method means)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(evaluations, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = comparison_frame(evaluations)
    frame.to_csv(out_dir / "comparison.csv", index=False)
    means = frame.groupby("method")[["clip_t", "clip_i", "dino", "clip_i_norm", "dino_norm"]].agg(["mean", "std", "count"])
    lines = ["| concept | method | CLIP-T | CLIP-I | CLIP-I floor | CLIP-I ceiling | CLIP-I norm | DINO | DINO floor | "
             "DINO ceiling | DINO norm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.concept} | {r.method} | {r.clip_t:.4f} | {r.clip_i:.4f} | {r.clip_i_floor:.4f} | {r.clip_i_ceiling:.4f} "
              f"| {r.clip_i_norm:.4f} | {r.dino:.4f} | {r.dino_floor:.4f} | {r.dino_ceiling:.4f} | {r.dino_norm:.4f} |"
              for r in frame.itertuples()]
    lines += ["", f"Scores are {SCALE}s. Floor: the base model asked for the class in place of the subject; ceiling: "
              "real photos of the subject kept out of training (without them, each reference photo against the others); "
              "norm = (score - floor) / (ceiling - floor).", ""]
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    scatter = scatter_plot(frame, out_dir / "scatter.png")
    links = "".join(f"<li><a href='{os.path.relpath(p, out_dir)}'>{html.escape(c)} / {html.escape(m)}</a></li>"
                    for c, m, p in zip(frame["concept"], frame["method"], frame["report"]))
    (out_dir / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>comparison</title><style>body{font-family:sans-serif;"
        "margin:2em} td,th{padding:2px 10px}</style></head><body><h1>Runs compared</h1>"
        f"<p>Scores are {SCALE}s.</p>{frame.drop(columns=['report']).to_html(index=False, float_format='%.4f')}"
        f"<h2>Per method</h2>{means.to_html(float_format='%.4f')}<h2>Text alignment vs identity</h2>"
        f"<img src='scatter.png'><h2>Run reports</h2><ul>{links}</ul></body></html>"
    )
    return {"csv": out_dir / "comparison.csv", "markdown": out_dir / "comparison.md", "scatter": scatter,
            "html": out_dir / "index.html"}
