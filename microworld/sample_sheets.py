"""Contact sheets of the quality benchmark's samples, so that every number in docs/quality.md can be read next to
the pictures it scores: the evaluation samples of each run, and each subject of the two-subject photo prompted
alone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

LABEL_WIDTH = 150
HEADER_HEIGHT = 28
WHITE = (255, 255, 255)


def _labelled_row(label: str, images: list[Image.Image], size: int) -> Image.Image:
    row = Image.new("RGB", (LABEL_WIDTH + size * len(images), size), WHITE)
    ImageDraw.Draw(row).multiline_text((4, size // 2 - 12), label, fill=(0, 0, 0))
    for k, image in enumerate(images):
        row.paste(image.convert("RGB").resize((size, size)), (LABEL_WIDTH + k * size, 0))
    return row


def _stack(rows: list[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), WHITE)
    top = 0
    for r in rows:
        sheet.paste(r, (0, top))
        top += r.height
    return sheet


def eval_sheet(frame: pd.DataFrame, work: Path, path: Path, seed: int = 0, sample: int = 0, size: int = 64) -> Path | None:
    """One row per finished single-subject run of `seed` (by concept, then method): the concept's first training
    photo, then its evaluation samples (`sample` of each prompt, in prompt order)."""
    runs = frame[(frame["seed"] == seed) & (frame["group"] == "single") & (frame["status"] == "finished")
                 & frame["report"].notna()].sort_values(["concept", "method"])
    rows, reports = [], []
    for _, run in runs.iterrows():
        report = work / run["report"]
        samples = sorted((report.parent / "images").glob(f"p*-s{sample}.png"))
        if not samples:
            continue
        reports.append(report)
        photo = work / "concepts" / run["concept"] / "0.png"
        pictures = ([Image.open(photo)] if photo.is_file() else []) + [Image.open(p) for p in samples]
        rows.append(_labelled_row(f"{run['concept']}\n{run['method']}", pictures, size))
    if not rows:
        return None
    header = _header(["training photo", *_prompt_words(reports[0])], size)
    _stack([header, *rows]).save(path, quality=90)
    return path


def _prompt_words(report: Path) -> list[str]:
    """Each evaluation prompt's own words (those all prompts share, such as the class noun, left out)."""
    texts = pd.read_csv(report.parent / "scores.csv").drop_duplicates("prompt_index").sort_values("prompt_index")["text"]
    words = [t.split() for t in texts]
    shared = set.intersection(*map(set, words)) | {"photo", "in", "on", "at", "the", "of"}
    return [" ".join(w for w in ws if w not in shared) for ws in words]


def _header(labels: list[str], size: int) -> Image.Image:
    header = Image.new("RGB", (LABEL_WIDTH + size * len(labels), HEADER_HEIGHT), WHITE)
    draw = ImageDraw.Draw(header)
    draw.multiline_text((4, 2), "concept\nmethod", fill=(0, 0, 0))
    for k, label in enumerate(labels):
        draw.multiline_text((LABEL_WIDTH + k * size + 2, 2), label.replace(" ", "\n", 1)[:24], fill=(0, 0, 0))
    return header


def pair_sheet(work: Path, path: Path, seed: int = 0) -> Path | None:
    """Side by side, for `seed`: each two-subject method's samples with each subject prompted alone (one column
    per method and subject; rows are the prompts, as `microworld.probes.subject_separation` drew them)."""
    grids = sorted((work / "pair-subjects" / "samples").glob(f"*-seed{seed}-*.png"))
    if not grids:
        return None
    images = [Image.open(g).convert("RGB") for g in grids]
    sheet = Image.new("RGB", (sum(i.width for i in images), HEADER_HEIGHT + max(i.height for i in images)), WHITE)
    draw, left = ImageDraw.Draw(sheet), 0
    for grid, image in zip(grids, images):
        method, subject = grid.stem.split(f"-seed{seed}-")
        draw.multiline_text((left + 2, 2), f"{method.split('_(')[0].replace('_', ' ')}\n{subject}", fill=(0, 0, 0))
        sheet.paste(image, (left, HEADER_HEIGHT))
        left += image.width
    sheet.save(path, quality=90)
    return path
