"""A small procedural world: coloured, patterned shapes in scenes, drawn deterministically from a seed, with
captions from one grammar ("a photo of a red striped star on the beach") that parse back into their labels.

Training objects carry one colour, and their pattern is drawn in white or in a second colour ("a yellow and purple
striped star"), so a base model can draw two colours on one object. Held-out concepts (concepts.py) each carry a
compound mark (a ring or eyes) that the training distribution never shows.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

SIZE = 64
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges

COLOURS = {
    "red": (215, 40, 40), "orange": (240, 135, 25), "yellow": (235, 210, 35), "green": (45, 160, 60),
    "blue": (40, 85, 215), "purple": (135, 55, 185), "pink": (240, 120, 185), "brown": (125, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
PATTERNS = ("plain", "striped", "dotted", "checked")
SCENES = {"snow": "in the snow", "grass": "on the grass", "beach": "on the beach", "night": "at night",
          "table": "on a table", "water": "in the water"}
STYLES = {"photo": "a photo of", "sketch": "a sketch of", "blurry": "a blurry photo of", "painting": "a painting of"}
MARKS = ("none", "ring", "eye")  # compound marks: held-out concepts only


@dataclass(frozen=True)
class Thing:
    """One object: what it is and how it sits in the picture."""

    shape: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str | None = None  # None: white; a colour name: the pattern in that colour
    mark: str = "none"
    size: float = 0.55  # fraction of the image
    x: float = 0.5
    y: float = 0.55
    angle: float = 0.0  # degrees


@dataclass(frozen=True)
class Scene:
    thing: Thing
    scene: str = "grass"
    style: str = "photo"
    seed: int = 0  # background details (snowflakes, stars, waves)


# ---------------------------------------------------------------------------------------------- drawing


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rotate(points):
        a = math.radians(angle)
        return [(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)) for x, y in points]

    if shape == "square":
        s = r * 0.85
        return rotate([(-s, -s), (s, -s), (s, s), (-s, s)])
    if shape == "triangle":
        return rotate([(r * math.cos(math.radians(t)), r * math.sin(math.radians(t))) for t in (-90, 30, 150)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            t = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(t), rad * math.sin(t)))
        return rotate(pts)
    if shape == "cross":
        w = r * 0.36
        return rotate([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)])
    if shape == "diamond":
        return rotate([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if shape == "hexagon":
        return rotate([(r * math.cos(math.radians(60 * k)), r * math.sin(math.radians(60 * k))) for k in range(6)])
    if shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17))
        return rotate(pts)
    raise ValueError(shape)


def _mask(thing: Thing, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = thing.x * size, thing.y * size, thing.size * size / 2
    if thing.shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        d.polygon(_polygon(thing.shape, cx, cy, r, thing.angle), fill=255)
    return mask


def _pattern_layer(thing: Thing, size: int) -> Image.Image | None:
    """The pattern as a mask over the whole canvas (clipped to the shape later), rotated with the object."""
    if thing.pattern == "plain":
        return None
    big = size * 2
    layer = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(layer)
    step = max(4, int(thing.size * size / 4))
    if thing.pattern == "striped":
        for k in range(-big, big, step):
            d.rectangle((k, 0, k + step // 2, big), fill=255)
    elif thing.pattern == "dotted":
        rad = max(1, step // 4)
        for i in range(0, big, step):
            for j in range(0, big, step):
                d.ellipse((i - rad, j - rad, i + rad, j + rad), fill=255)
    elif thing.pattern == "checked":
        for i in range(0, big, step):
            for j in range(0, big, step):
                if (i // step + j // step) % 2 == 0:
                    d.rectangle((i, j, i + step - 1, j + step - 1), fill=255)
    layer = layer.rotate(thing.angle + 20, resample=Image.NEAREST, center=(big / 2, big / 2))
    offset = (int(thing.x * size - big / 2), int(thing.y * size - big / 2))
    out = Image.new("L", (size, size), 0)
    out.paste(layer, offset)
    return out


def _background(scene: str, size: int, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    horizon = int(size * rng.uniform(0.38, 0.5))
    if scene == "snow":
        d.rectangle((0, 0, size, horizon), fill=(205, 215, 228))
        d.rectangle((0, horizon, size, size), fill=(246, 248, 252))
        for _ in range(40):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            d.ellipse((x, y, x + 2 * SUPERSAMPLE, y + 2 * SUPERSAMPLE), fill=(255, 255, 255))
    elif scene == "grass":
        d.rectangle((0, 0, size, horizon), fill=(120, 185, 240))
        d.rectangle((0, horizon, size, size), fill=(70, 150, 45))
        for _ in range(60):
            x, y = rng.uniform(0, size), rng.uniform(horizon, size)
            d.line((x, y, x + rng.uniform(-2, 2), y - 3 * SUPERSAMPLE), fill=(40, 115, 30), width=SUPERSAMPLE)
    elif scene == "beach":
        d.rectangle((0, 0, size, horizon), fill=(135, 200, 245))
        d.rectangle((0, horizon, size, horizon + size // 8), fill=(40, 120, 200))
        d.rectangle((0, horizon + size // 8, size, size), fill=(230, 205, 140))
    elif scene == "night":
        d.rectangle((0, 0, size, size), fill=(15, 20, 55))
        d.rectangle((0, int(size * 0.8), size, size), fill=(25, 30, 40))
        for _ in range(25):
            x, y = rng.uniform(0, size), rng.uniform(0, size * 0.75)
            d.point((x, y), fill=(250, 250, 210))
        mx, my = rng.uniform(0.1, 0.3) * size, rng.uniform(0.08, 0.2) * size
        d.ellipse((mx, my, mx + size / 10, my + size / 10), fill=(240, 240, 200))
    elif scene == "table":
        d.rectangle((0, 0, size, horizon), fill=(225, 210, 185))
        d.rectangle((0, horizon, size, size), fill=(150, 95, 50))
        for k in range(horizon, size, 3 * SUPERSAMPLE):
            d.line((0, k, size, k + rng.uniform(-2, 2)), fill=(130, 80, 40), width=1)
    elif scene == "water":
        d.rectangle((0, 0, size, size), fill=(30, 105, 175))
        for k in range(0, size, 5 * SUPERSAMPLE):
            shift = rng.uniform(0, 8)
            for x in range(-8, size, 8 * SUPERSAMPLE):
                d.arc((x + shift, k, x + shift + 8 * SUPERSAMPLE, k + 4 * SUPERSAMPLE), 200, 340, fill=(120, 180, 230), width=SUPERSAMPLE)
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return im


def _mark(im: Image.Image, thing: Thing, size: int) -> None:
    d = ImageDraw.Draw(im)
    cx, cy, r = thing.x * size, thing.y * size, thing.size * size / 2
    if thing.mark == "ring":
        d.ellipse((cx - r * 0.42, cy - r * 0.42, cx + r * 0.42, cy + r * 0.42), outline=(20, 20, 20), width=max(2, int(r * 0.12)))
    elif thing.mark == "eye":
        for dx in (-0.28, 0.28):
            ex, ey, er = cx + dx * r, cy - 0.12 * r, r * 0.17
            d.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255))
            d.ellipse((ex - er / 2, ey - er / 2, ex + er / 2, ey + er / 2), fill=(10, 10, 10))


def _style(im: Image.Image, style: str) -> Image.Image:
    if style == "photo":
        return im
    if style == "blurry":
        return im.filter(ImageFilter.GaussianBlur(2.2))
    if style == "sketch":
        edges = ImageOps.invert(im.convert("L").filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 28 else 0))
        return Image.merge("RGB", [edges] * 3).filter(ImageFilter.GaussianBlur(0.4))
    if style == "painting":
        return ImageOps.posterize(im.filter(ImageFilter.ModeFilter(5)), 3)
    raise ValueError(f"unknown style {style!r}")


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    rng = random.Random(scene.seed)
    im = _background(scene.scene, big, rng)
    thing = scene.thing
    body = Image.new("RGB", (big, big), COLOURS[thing.colour])
    pattern = _pattern_layer(thing, big)
    if pattern is not None:
        colour = COLOURS[thing.pattern_colour] if thing.pattern_colour else (250, 250, 250)
        body.paste(Image.new("RGB", (big, big), colour), (0, 0), pattern)
    if scene.scene == "night":  # objects are dimmer at night
        body = ImageChops.multiply(body, Image.new("RGB", (big, big), (150, 150, 175)))
    shadow = _mask(replace(thing, x=thing.x + 0.03, y=thing.y + 0.03), big).filter(ImageFilter.GaussianBlur(3))
    im.paste(Image.new("RGB", (big, big), (0, 0, 0)), (0, 0), shadow.point(lambda v: v * 0.35))
    im.paste(body, (0, 0), _mask(thing, big))
    _mark(im, thing, big)
    return _style(im.resize((size, size), Image.LANCZOS), scene.style)


def render_pair(first: Thing, second: Thing, scene: str, seed: int = 0, size: int = SIZE) -> Image.Image:
    """Two objects in one photo (several subjects from one image, as DisenDiff learns them)."""
    big = size * SUPERSAMPLE
    im = _background(scene, big, random.Random(seed))
    for thing in (first, second):
        body = Image.new("RGB", (big, big), COLOURS[thing.colour])
        pattern = _pattern_layer(thing, big)
        if pattern is not None:
            colour = COLOURS[thing.pattern_colour] if thing.pattern_colour else (250, 250, 250)
            body.paste(Image.new("RGB", (big, big), colour), (0, 0), pattern)
        im.paste(body, (0, 0), _mask(thing, big))
        _mark(im, thing, big)
    return im.resize((size, size), Image.LANCZOS)


def foreground_mask(scene: Scene, size: int = SIZE) -> Image.Image:
    return _mask(scene.thing, size * SUPERSAMPLE).resize((size, size), Image.BILINEAR)


def pair_mask(first: Thing, second: Thing, size: int = SIZE) -> Image.Image:
    """Both subjects of a `render_pair` photo as one foreground mask."""
    big = size * SUPERSAMPLE
    return ImageChops.lighter(_mask(first, big), _mask(second, big)).resize((size, size), Image.BILINEAR)


# ---------------------------------------------------------------------------------------------- captions


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Caption:
    """Which labels a caption states (any may be left out)."""

    style: str = "photo"
    colour: str | None = None
    pattern: str | None = None
    shape: str | None = None
    scene: str | None = None
    pattern_colour: str | None = None  # stated only for a pattern in a colour (white goes unsaid)
    extra: dict = field(default_factory=dict)


def caption(scene: Scene, keep_colour=True, keep_pattern=True, keep_scene=True) -> str:
    """'a photo of a red striped star on the beach', 'a photo of a red and blue striped star'; plain objects say no
    pattern word, a white pattern no second colour. Leaving out the colour or the pattern leaves out the pattern's
    colour too."""
    t = scene.thing
    words = []
    if keep_colour:
        words.append(t.colour)
    if keep_pattern and t.pattern != "plain":
        if keep_colour and t.pattern_colour:
            words += ["and", t.pattern_colour]
        words.append(t.pattern)
    words.append(t.shape)
    text = f"{STYLES[scene.style]} {article(words[0])} {' '.join(words)}"
    return f"{text} {SCENES[scene.scene]}" if keep_scene else text


_STYLE_RE = "|".join(re.escape(v) for v in sorted(STYLES.values(), key=len, reverse=True))
_SCENE_RE = "|".join(re.escape(v) for v in SCENES.values())
_COLOUR_RE = "|".join(COLOURS)
CAPTION_RE = re.compile(
    rf"^(?P<style>{_STYLE_RE}) an? (?:(?P<colour>{_COLOUR_RE}) )?"
    rf"(?:(?:and (?P<pattern_colour>{_COLOUR_RE}) )?(?P<pattern>{'|'.join(PATTERNS[1:])}) )?"
    rf"(?P<shape>{'|'.join(SHAPES)})(?: (?P<scene>{_SCENE_RE}))?$"
)


def parse_caption(text: str) -> Caption:
    m = CAPTION_RE.match(text)
    if not m or (m["pattern_colour"] and (not m["colour"] or m["pattern_colour"] == m["colour"])):
        raise ValueError(f"not a world caption: {text!r}")
    style = {v: k for k, v in STYLES.items()}[m["style"]]
    scene = {v: k for k, v in SCENES.items()}[m["scene"]] if m["scene"] else None
    return Caption(style, m["colour"], m["pattern"] or ("plain" if m["colour"] else None), m["shape"], scene, m["pattern_colour"])


# ---------------------------------------------------------------------------------------------- sampling


WHITE_PATTERN_SHARE = 0.4  # of patterned training objects; the rest have their pattern in a second colour


def random_thing(rng: random.Random, **fixed) -> Thing:
    values = dict(
        shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), pattern=rng.choice(PATTERNS),
        size=rng.uniform(0.42, 0.7), x=rng.uniform(0.35, 0.65), y=rng.uniform(0.45, 0.62), angle=rng.uniform(-25, 25),
    )
    values.update(fixed)
    if "pattern_colour" not in fixed:  # drawn last, so that a fixed pattern colour keeps the poses of the stream
        others = [c for c in COLOURS if c != values["colour"]]
        second = rng.choice(others) if rng.random() >= WHITE_PATTERN_SHARE else None
        values["pattern_colour"] = second if values["pattern"] != "plain" else None
    return Thing(**values)


def random_scene(seed: int, style_weights=(0.7, 0.1, 0.1, 0.1), **fixed_thing) -> Scene:
    """One training picture: a training-world object (a white or coloured pattern, no mark) in a random scene and
    style."""
    rng = random.Random(seed)
    style = rng.choices(list(STYLES), weights=style_weights)[0]
    return Scene(random_thing(rng, **fixed_thing), rng.choice(list(SCENES)), style, seed=rng.randrange(1 << 30))


def training_caption(scene: Scene, rng: random.Random) -> str:
    """Captions sometimes leave out colour, pattern or scene, so shorter prompts are understood too."""
    return caption(scene, keep_colour=rng.random() > 0.1, keep_pattern=rng.random() > 0.2, keep_scene=rng.random() > 0.15)
