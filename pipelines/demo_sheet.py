"""The demo's overview: one row per concept, its training photos then each method's sample grid (prompts in
rows, seeds in columns), so that one picture shows whether each method put the concept in the scenes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from personalize.images import list_image_files

HEADER = 16
SCALE = 2


def demo_sheet(runs: Path, concepts: Path, methods: list[str], out: Path, photos: int = 2) -> Path | None:
    rows = []
    for concept in sorted(p.name for p in runs.iterdir() if p.is_dir() and (concepts / p.name).is_dir()):
        grids = [runs / concept / m / "samples.png" for m in methods]
        if not all(g.is_file() for g in grids):
            continue
        cells = [Image.open(g).convert("RGB") for g in grids]
        height = cells[0].height
        pictures = [Image.open(f).convert("RGB").resize((64, 64)) for f in list_image_files(concept, concepts / concept)[:photos]]
        column = Image.new("RGB", (64, height), (255, 255, 255))
        for i, picture in enumerate(pictures):
            column.paste(picture, (0, 12 + i * 76))
        rows.append((concept, [column, *cells]))
    if not rows:
        return None
    widths = [max(cells[i].width for _, cells in rows) for i in range(len(rows[0][1]))]
    height = max(c.height for _, cells in rows for c in cells)
    sheet = Image.new("RGB", (sum(widths) + 8 * len(widths), HEADER + len(rows) * (height + HEADER)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    x = 0
    for i, title in enumerate(["photos", *methods]):
        draw.text((x + 2, 2), title[: widths[i] // 6], fill=(0, 0, 0))
        x += widths[i] + 8
    for r, (concept, cells) in enumerate(rows):
        y = HEADER + r * (height + HEADER)
        draw.text((2, y + 2), concept, fill=(120, 0, 0))
        x = 0
        for i, cell in enumerate(cells):
            sheet.paste(cell, (x, y + HEADER))
            x += widths[i] + 8
    sheet = sheet.resize((sheet.width * SCALE, sheet.height * SCALE), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
