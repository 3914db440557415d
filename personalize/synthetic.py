"""Synthetic concepts drawn on the fly: a distinct patterned object photographed against varied backgrounds.

Used by the demo and the examples so that nothing has to be downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class SyntheticConcept:
    id: str
    super_category: str
    kind: str
    body: tuple[int, int, int]
    stripes: tuple[int, int, int]
    shape: str  # ellipse | box | triangle


DEFAULT_CONCEPTS = (
    SyntheticConcept("striped-ball", "ball", "object", (220, 40, 40), (250, 230, 60), "ellipse"),
    SyntheticConcept("checked-box", "box", "object", (40, 90, 220), (240, 240, 240), "box"),
    SyntheticConcept("dotted-cone", "toy", "object", (40, 180, 90), (120, 20, 120), "triangle"),
)


def draw_photo(concept: SyntheticConcept, size: int, rng: random.Random) -> Image.Image:
    sky = tuple(rng.randrange(60, 230) for _ in range(3))
    ground = tuple(rng.randrange(30, 200) for _ in range(3))
    im = Image.new("RGB", (size, size), sky)
    d = ImageDraw.Draw(im)
    horizon = rng.randrange(size // 2, size * 3 // 4)
    d.rectangle((0, horizon, size, size), fill=ground)
    scale = rng.uniform(0.45, 0.7) * size
    cx, cy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.45, 0.6) * size
    box = (cx - scale / 2, cy - scale / 2, cx + scale / 2, cy + scale / 2)
    mask = Image.new("L", (size, size), 0)
    m = ImageDraw.Draw(mask)
    if concept.shape == "ellipse":
        m.ellipse(box, fill=255)
    elif concept.shape == "box":
        m.rectangle(box, fill=255)
    else:
        m.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)
    pattern = Image.new("RGB", (size, size), concept.body)
    p = ImageDraw.Draw(pattern)
    step = max(4, int(scale / 6))
    for k in range(-size, 2 * size, step * 2):  # diagonal stripes
        p.polygon([(k, 0), (k + step, 0), (k + step - size, size), (k - size, size)], fill=concept.stripes)
    im.paste(pattern.rotate(rng.uniform(-30, 30)), (0, 0), mask)
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))


def write_concepts(folder: str | Path, concepts=DEFAULT_CONCEPTS, photos: int = 5, size: int = 128, seed: int = 0) -> Path:
    """Draw each concept's photos into folder/<id>/ and write folder/concepts.yaml; returns the manifest path."""
    folder = Path(folder)
    rows = []
    for index, concept in enumerate(concepts):
        rng = random.Random(seed * 1000 + index)
        target = folder / concept.id
        target.mkdir(parents=True, exist_ok=True)
        for i in range(photos):
            draw_photo(concept, size, rng).save(target / f"{i}.png")
        rows.append({"id": concept.id, "images": concept.id, "super_category": concept.super_category, "kind": concept.kind})
    manifest = folder / "concepts.yaml"
    manifest.write_text(yaml.safe_dump({"concepts": rows}, sort_keys=False))
    return manifest
