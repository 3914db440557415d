"""Held-out subjects to personalise, photographed 4-6 times in varied poses and scenes. Each is made of what the
base model can draw (a shape, a colour, a pattern in white or a second colour) plus a mark the training world
never shows (a ring or eyes), which only fine-tuning can teach. Their super-category is their shape noun, which
the base model knows. Subjects with eyes count as animate-like. Each also has held-out photos, never trained on:
the ceiling its identity scores are read against."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from microworld.world import SCENES, STYLES, Scene, Thing, foreground_mask, random_thing, render

HOLDOUT_PHOTOS = 8


@dataclass(frozen=True)
class WorldConcept:
    id: str
    shape: str
    colour: str
    pattern: str
    pattern_colour: str | None
    mark: str

    @property
    def kind(self) -> str:
        return "animate" if self.mark == "eye" else "object"

    def thing(self, rng: random.Random) -> Thing:
        return random_thing(rng, shape=self.shape, colour=self.colour, pattern=self.pattern,
                            pattern_colour=self.pattern_colour, mark=self.mark)


CONCEPTS = (
    WorldConcept("zebra-star", "star", "yellow", "striped", "purple", "ring"),
    WorldConcept("berry-heart", "heart", "pink", "dotted", "green", "ring"),
    WorldConcept("target-circle", "circle", "blue", "plain", None, "ring"),
    WorldConcept("candy-cross", "cross", "red", "striped", "blue", "ring"),
    WorldConcept("tile-square", "square", "orange", "checked", "purple", "ring"),
    WorldConcept("owl-hexagon", "hexagon", "brown", "checked", "orange", "eye"),
    WorldConcept("frog-diamond", "diamond", "green", "dotted", "yellow", "eye"),
    WorldConcept("peak-triangle", "triangle", "purple", "striped", "yellow", "eye"),
)


def photos(concept: WorldConcept, count: int = 5, seed: int = 0) -> list[Scene]:
    """Photos in distinct scenes (as many as there are), varied pose, size and position."""
    rng = random.Random(f"{concept.id}-{seed}")
    scenes = rng.sample(list(SCENES), k=min(count, len(SCENES)))
    scenes += [rng.choice(list(SCENES)) for _ in range(count - len(scenes))]
    return [Scene(concept.thing(rng), scene, "photo", seed=rng.randrange(1 << 30)) for scene in scenes]


HOLDOUT_STYLE_WEIGHTS = {"photo": 9, "sketch": 1, "blurry": 1, "painting": 1}


def holdout_photos(concept: WorldConcept, count: int = HOLDOUT_PHOTOS, seed: int = 0) -> list[Scene]:
    """Fresh photos kept out of training, for the identity ceiling: new poses and scenes, styles weighted as in the
    evaluation prompts (world_eval: 9 photos, 1 sketch, 1 blurry, 1 painting in 12), from a random stream of their
    own (the training photos' never repeats here)."""
    rng = random.Random(f"{concept.id}-holdout-{seed}")
    styles, weights = list(STYLES), [HOLDOUT_STYLE_WEIGHTS[s] for s in STYLES]
    return [Scene(concept.thing(rng), rng.choice(list(SCENES)), rng.choices(styles, weights)[0], seed=rng.randrange(1 << 30))
            for _ in range(count)]


def write_concepts(folder: str | Path, concepts=CONCEPTS, count: int = 5, seed: int = 0, size: int = 64) -> Path:
    """folder/<id>/ photos, folder/<id>-masks/ foreground masks, folder/<id>-holdout/ held-out photos,
    folder/concepts.yaml; returns the manifest."""
    folder = Path(folder)
    rows = []
    for concept in concepts:
        images, masks, holdout = folder / concept.id, folder / f"{concept.id}-masks", folder / f"{concept.id}-holdout"
        for target in (images, masks, holdout):
            target.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(photos(concept, count, seed)):
            render(scene, size).save(images / f"{i}.png")
            foreground_mask(scene, size).save(masks / f"{i}.png")
        for i, scene in enumerate(holdout_photos(concept, seed=seed)):
            render(scene, size).save(holdout / f"{i}.png")
        rows.append({"id": concept.id, "images": concept.id, "masks": f"{concept.id}-masks", "holdout": holdout.name,
                     "super_category": concept.shape, "kind": concept.kind})
    manifest = folder / "concepts.yaml"
    manifest.write_text(yaml.safe_dump({"concepts": rows}, sort_keys=False))
    return manifest


def write_pair(folder: str | Path, first: WorldConcept, second: WorldConcept, seed: int = 0, size: int = 64) -> dict:
    """One photo holding two held-out subjects side by side, with its foreground mask (both subjects), and held-out
    photos of the pair; returns its manifest row (two subjects)."""
    from microworld.world import pair_mask, render_pair

    rng = random.Random(f"{first.id}+{second.id}-{seed}")
    pair_id = f"{first.id}+{second.id}".replace("+", "-and-")
    masks = Path(folder) / f"{pair_id}-masks"
    masks.mkdir(parents=True, exist_ok=True)
    for name, count in ((pair_id, 1), (f"{pair_id}-holdout", HOLDOUT_PHOTOS)):  # the training photo, then held-out ones
        target = Path(folder) / name
        target.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            left = replace(first.thing(rng), size=0.42, x=0.28, y=0.55)
            right = replace(second.thing(rng), size=0.42, x=0.72, y=0.55)
            render_pair(left, right, rng.choice(list(SCENES)), rng.randrange(1 << 30), size).save(target / f"{i}.png")
            if name == pair_id:
                pair_mask(left, right, size).save(masks / f"{i}.png")
    return {"id": pair_id, "images": pair_id, "masks": masks.name, "holdout": f"{pair_id}-holdout",
            "subjects": [{"super_category": first.shape}, {"super_category": second.shape}], "kind": "object"}
