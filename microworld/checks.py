"""Measurements of the world models: zero-shot CLIP accuracy, prompt following of the base model,
identity retrieval of held-out concepts. Used by the model cards and the tests."""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from microworld.concepts import CONCEPTS, photos
from microworld.world import COLOURS, PATTERNS, SCENES, SHAPES, STYLES, Scene, article, random_thing, render


def text_head(clip, prompts: dict[str, list[str]]) -> tuple[list[str], torch.Tensor]:
    """Labels and their unit text features, each the mean over the label's prompt ensemble."""
    feats = [torch.nn.functional.normalize(clip.text_features(p).mean(0), dim=-1) for p in prompts.values()]
    return list(prompts), torch.stack(feats)


class ZeroShot:
    """Classify colour, shape and scene of pictures with a CLIP scorer, from prompt ensembles of the grammar."""

    def __init__(self, clip):
        self.clip = clip
        self.heads = {
            "colour": text_head(clip, {c: [f"a photo of {article(c)} {c} {s}" for s in SHAPES] for c in COLOURS}),
            "shape": text_head(clip, {s: [f"a photo of a {c} {s}" for c in ("red", "blue", "green", "yellow")] for s in SHAPES}),
            "scene": text_head(clip, {k: [f"a photo of a {s} {v}" for s in SHAPES] for k, v in SCENES.items()}),
        }

    def predict(self, images, attribute: str) -> list[str]:
        labels, feats = self.heads[attribute]
        return [labels[i] for i in (self.clip.image_features(images) @ feats.T).argmax(1).tolist()]


def fresh_photos(count: int, seed: int) -> list[Scene]:
    """`count` photo scenes of random objects, from a seed the training never used."""
    rng = random.Random(seed)
    return [Scene(random_thing(rng), rng.choice(list(SCENES)), "photo", rng.randrange(1 << 30)) for _ in range(count)]


def zero_shot_accuracy(clip, count: int = 240, seed: int = 12345) -> dict[str, float]:
    """Accuracy on fresh photos: colour, shape and scene."""
    scenes = fresh_photos(count, seed)
    images = [render(s) for s in scenes]
    zs = ZeroShot(clip)
    truth = {"colour": [s.thing.colour for s in scenes], "shape": [s.thing.shape for s in scenes],
             "scene": [s.scene for s in scenes]}
    return {k: sum(p == t for p, t in zip(zs.predict(images, k), truth[k])) / count for k in truth}


def shape_through_vae(vae, clip, count: int = 120, seed: int = 777) -> dict[str, float]:
    """Zero-shot shape accuracy on fresh photos and on the VAE's reconstructions of the same photos: the second is
    the most the base model's samples can reach through its latents."""
    import numpy as np
    from PIL import Image

    from microworld.data import to_tensor, to_uint8

    scenes = fresh_photos(count, seed)
    pictures = [render(s).convert("RGB") for s in scenes]
    with torch.no_grad():
        latents = vae.encode(to_tensor(np.stack([np.asarray(p) for p in pictures]))).latent_dist.mean
        rebuilt = [Image.fromarray(a) for a in to_uint8(vae.decode(latents).sample)]
    zs = ZeroShot(clip)
    return {name: sum(p == s.thing.shape for p, s in zip(zs.predict(images, "shape"), scenes)) / count
            for name, images in (("photos", pictures), ("reconstructions", rebuilt))}


def pattern_colour_prompts(body: str, pattern: str, shape: str) -> dict[str, list[str]]:
    """For an object whose body colour, pattern and shape are known: one prompt per candidate pattern colour."""
    return {c: [f"a photo of {article(body)} {body} and {c} {pattern} {shape}"] for c in COLOURS if c != body}


def pattern_colours(clip, images, things) -> list[str]:
    """The pattern colour of each picture, chosen among the seven colours other than its body colour, with the
    body colour, pattern and shape given (so only the second colour is being judged; chance 1/7)."""
    heads = {thing: text_head(clip, pattern_colour_prompts(*thing)) for thing in set(things)}
    out = []
    for f, thing in zip(clip.image_features(images), things):
        labels, text = heads[thing]
        out.append(labels[int((text @ f).argmax())])
    return out


def two_colour_things(count: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(body colour, pattern colour, pattern, shape) for `count` patterned two-colour objects, drawn evenly."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        body = rng.choice(list(COLOURS))
        out.append((body, rng.choice([c for c in COLOURS if c != body]), rng.choice(PATTERNS[1:]), rng.choice(SHAPES)))
    return out


def pattern_colour_accuracy(clip, count: int = 120, seed: int = 12346) -> float:
    """Zero-shot pattern-colour accuracy on fresh photos of objects whose pattern has a second colour."""
    rng = random.Random(seed)
    scenes = [Scene(random_thing(rng, colour=body, pattern_colour=second, pattern=pattern, shape=shape),
                    rng.choice(list(SCENES)), "photo", rng.randrange(1 << 30))
              for body, second, pattern, shape in two_colour_things(count, seed)]
    predicted = pattern_colours(clip, [render(s) for s in scenes], [(s.thing.colour, s.thing.pattern, s.thing.shape) for s in scenes])
    return sum(p == s.thing.pattern_colour for p, s in zip(predicted, scenes)) / count


def pattern_colour_following(pipe, clip, count: int = 16, steps: int = 25, seed: int = 0) -> float:
    """Generate 'a photo of a yellow and purple striped star ...' prompts; the share whose pattern the world CLIP
    judges to be in the prompted second colour."""
    from personalize.sampling import generate

    things, scenes = two_colour_things(count, seed), random.Random(seed + 1)
    prompts = [f"{STYLES['photo']} {article(body)} {body} and {second} {pattern} {shape} {SCENES[scenes.choice(list(SCENES))]}"
               for body, second, pattern, shape in things]
    images = generate(pipe, prompts, list(range(count)), 64, steps=steps, guidance_scale=5.0)
    predicted = pattern_colours(clip, images, [(body, pattern, shape) for body, _, pattern, shape in things])
    return sum(p == second for p, (_, second, _, _) in zip(predicted, things)) / count


class Asked(NamedTuple):
    prompt: str
    colour: str
    shape: str
    scene: str


def following_prompts(per_colour: int = 2, seed: int = 0) -> list[Asked]:
    """Prompts covering every colour, shapes and scenes spread evenly, with what each asks for."""
    rng = random.Random(seed)
    out = []
    for colour in COLOURS:
        for _ in range(per_colour):
            shape, scene = rng.choice(SHAPES), rng.choice(list(SCENES))
            out.append(Asked(f"{STYLES['photo']} {article(colour)} {colour} {shape} {SCENES[scene]}", colour, shape, scene))
    return out


def prompt_following(pipe, clip, per_colour: int = 2, steps: int = 25, seed: int = 0) -> tuple[dict, list]:
    """Generate from colour/shape/scene prompts; the world CLIP judges whether colour, shape and scene were
    followed."""
    from personalize.sampling import generate

    asked = following_prompts(per_colour, seed)
    images = generate(pipe, [a.prompt for a in asked], list(range(len(asked))), 64, steps=steps, guidance_scale=5.0)
    zs = ZeroShot(clip)
    result = {attribute: sum(p == getattr(a, attribute) for p, a in zip(zs.predict(images, attribute), asked)) / len(asked)
              for attribute in ("colour", "shape", "scene")}
    return {**result, "images": len(asked)}, images


def identity_retrieval(scorer, count: int = 5) -> float:
    """Each held-out concept's fresh photos matched to the concept whose reference photos they resemble most."""
    refs = [scorer.image_features([render(s) for s in photos(c, count, seed=0)]) for c in CONCEPTS]
    hits = 0
    for k, concept in enumerate(CONCEPTS):
        queries = scorer.image_features([render(s) for s in photos(concept, count, seed=1)])
        sims = torch.stack([(queries @ r.T).mean(1) for r in refs], 1)  # (queries, concepts)
        hits += int((sims.argmax(1) == k).sum())
    return hits / (count * len(CONCEPTS))
