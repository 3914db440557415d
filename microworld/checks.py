"""Measurements of the world models: zero-shot CLIP accuracy, prompt following of the base model,
identity retrieval of held-out concepts. Used by the model cards and the tests."""

from __future__ import annotations

import random

import torch

from microworld.concepts import CONCEPTS, photos
from microworld.world import COLOURS, SCENES, SHAPES, STYLES, Scene, random_thing, render


class ZeroShot:
    """Classify colour, shape and scene of pictures with a CLIP scorer, from prompt ensembles of the grammar."""

    def __init__(self, clip):
        self.clip = clip
        self.heads = {
            "colour": self._head({c: [f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for s in SHAPES] for c in COLOURS}),
            "shape": self._head({s: [f"a photo of a {c} {s}" for c in ("red", "blue", "green", "yellow")] for s in SHAPES}),
            "scene": self._head({k: [f"a photo of a {s} {v}" for s in SHAPES] for k, v in SCENES.items()}),
        }

    def _head(self, prompts: dict[str, list[str]]) -> tuple[list[str], torch.Tensor]:
        labels = list(prompts)
        feats = torch.stack([torch.nn.functional.normalize(self.clip.text_features(p).mean(0), dim=-1) for p in prompts.values()])
        return labels, feats

    def predict(self, images, attribute: str) -> list[str]:
        labels, feats = self.heads[attribute]
        return [labels[i] for i in (self.clip.image_features(images) @ feats.T).argmax(1).tolist()]


def zero_shot_accuracy(clip, count: int = 240, seed: int = 12345) -> dict[str, float]:
    """Accuracy on fresh photos (a seed the training never used): colour, shape and scene."""
    rng = random.Random(seed)
    scenes = [Scene(random_thing(rng), rng.choice(list(SCENES)), "photo", rng.randrange(1 << 30)) for _ in range(count)]
    images = [render(s) for s in scenes]
    zs = ZeroShot(clip)
    truth = {"colour": [s.thing.colour for s in scenes], "shape": [s.thing.shape for s in scenes],
             "scene": [s.scene for s in scenes]}
    return {k: sum(p == t for p, t in zip(zs.predict(images, k), truth[k])) / count for k in truth}


def following_prompts(per_colour: int = 2, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prompt, colour, scene) triples covering every colour, shapes and scenes spread evenly."""
    rng = random.Random(seed)
    out = []
    for colour in COLOURS:
        for _ in range(per_colour):
            shape, scene = rng.choice(SHAPES), rng.choice(list(SCENES))
            out.append((f"{STYLES['photo']} {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {SCENES[scene]}", colour, scene))
    return out


def prompt_following(pipe, clip, per_colour: int = 2, steps: int = 25, seed: int = 0) -> tuple[dict, list]:
    """Generate from colour/shape/scene prompts; the world CLIP judges whether colour and scene were followed."""
    from personalize.sampling import generate

    triples = following_prompts(per_colour, seed)
    images = generate(pipe, [p for p, _, _ in triples], list(range(len(triples))), 64, steps=steps, guidance_scale=5.0)
    zs = ZeroShot(clip)
    colours, scenes = zs.predict(images, "colour"), zs.predict(images, "scene")
    return {
        "colour": sum(c == t for c, (_, t, _) in zip(colours, triples)) / len(triples),
        "scene": sum(s == t for s, (_, _, t) in zip(scenes, triples)) / len(triples),
        "images": len(triples),
    }, images


def identity_retrieval(scorer, count: int = 5) -> float:
    """Each held-out concept's fresh photos matched to the concept whose reference photos they resemble most."""
    refs = [scorer.image_features([render(s) for s in photos(c, count, seed=0)]) for c in CONCEPTS]
    hits = 0
    for k, concept in enumerate(CONCEPTS):
        queries = scorer.image_features([render(s) for s in photos(concept, count, seed=1)])
        sims = torch.stack([(queries @ r.T).mean(1) for r in refs], 1)  # (queries, concepts)
        hits += int((sims.argmax(1) == k).sum())
    return hits / (count * len(CONCEPTS))
