"""Augmentation presets of the methods' codebases, driven by an explicit generator (reproducible, resumable).

ti:               resize to a square (bicubic, aspect not kept), h-flip p=0.5            (TI / diffusers TI)
dreambooth:       resize short side (bilinear), random crop, no flip                      (diffusers DreamBooth)
attn:             p=0.75 rotation in [-45, 45] (expand), resize short side, h-flip p=0.25, random crop
                  (AttnDreamBooth and CoRe share this dataset class)
custom_diffusion: centre square crop, h-flip p=0.5, then random rescale: p=2/3 scale in [S/3, S], else
                  [1.2 S, 1.4 S]; below 0.6 S the image is pasted on a mid-grey canvas, the caption gets
                  "a far away " / "very small " and the loss mask is the pasted box shrunk by one latent
                  pixel; above S it is cropped and the caption gets "zoomed in " / "close up "; in between
                  nothing changes (as in the official code).

A preset gets the square's side as `size`. Presets registered with `any_shape=True` (ti, dreambooth, attn) also
make non-square variants, for aspect-ratio buckets: `size` is then a (width, height) pair, and the photo is
resized to cover it and cropped to it (see `aspect_bucket`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Size = tuple[int, int]  # (width, height) in pixels


@dataclass
class Variant:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    mask: torch.Tensor | None  # (1, H / f, W / f) latent-resolution loss mask, or None (all ones)
    caption_prefix: str = ""


def as_size(size: int | Size) -> Size:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def aspect_bucket(width: int, height: int, resolution: int, step: int, max_ratio: float = 2.0) -> Size:
    """The training shape for a width x height photo: sides that are multiples of `step`, an area of at most
    resolution^2 (as large as the side allows), no side longer than `max_ratio` times the other, and the aspect
    ratio nearest the photo's (on a log scale; the larger area wins a tie). A square photo gets the square."""
    buckets = []
    for w in range(step, int(resolution * max_ratio) + 1, step):
        h = (resolution * resolution // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.append((w, h))
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def _uniform(gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (), generator=gen).item())


def to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def resize_to_cover(image: Image.Image, size: Size, resample=Image.BILINEAR) -> Image.Image:
    """The smallest resize (aspect kept) that covers width x height; for a square, the short side's resize."""
    (w, h), (width, height) = image.size, size
    scale = max(width / w, height / h)
    return image.resize((max(width, round(w * scale)), max(height, round(h * scale))), resample)


def random_crop(image: Image.Image, size: Size, gen: torch.Generator) -> Image.Image:
    (w, h), (width, height) = image.size, size
    left, top = _randint(gen, 0, w - width), _randint(gen, 0, h - height)
    return image.crop((left, top, left + width, top + height))


def center_crop(image: Image.Image, size: Size) -> Image.Image:
    (w, h), (width, height) = image.size, size
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def center_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def flip(image: Image.Image, p: float, gen: torch.Generator) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT) if _uniform(gen) < p else image


Augmentation = Callable[[Image.Image, "int | Size", int, torch.Generator], Variant]  # (photo, size, vae scale, generator)
AUGMENTATIONS: dict[str, Augmentation] = {}
ANY_SHAPE: set[str] = set()  # presets that also make non-square variants (aspect-ratio buckets)
WORDED: set[str] = set()  # presets whose variants carry caption words ("a far away ")


def augmentation(name: str, any_shape: bool = False, worded: bool = False):
    """Register a preset under the name a method's `augmentation:` key gives; `any_shape` if it takes a (width,
    height) size as well as a square's side; `worded` if its variants put words before the caption."""

    def add(fn: Augmentation) -> Augmentation:
        AUGMENTATIONS[name] = fn
        if any_shape:
            ANY_SHAPE.add(name)
        if worded:
            WORDED.add(name)
        return fn

    return add


def augment(image: Image.Image, preset: str, size: int | Size, vae_scale: int, gen: torch.Generator) -> Variant:
    if preset not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation preset {preset!r}; available: {', '.join(sorted(AUGMENTATIONS))}")
    width, height = as_size(size)
    if width == height:
        return AUGMENTATIONS[preset](image, width, vae_scale, gen)
    if preset not in ANY_SHAPE:
        raise ValueError(f"augmentation preset {preset!r} makes square variants only, not {width}x{height}")
    return AUGMENTATIONS[preset](image, (width, height), vae_scale, gen)


@augmentation("ti", any_shape=True)
def _ti(image: Image.Image, size: int | Size, vae_scale: int, gen: torch.Generator) -> Variant:
    return Variant(to_tensor(flip(image.resize(as_size(size), Image.BICUBIC), 0.5, gen)), None)


@augmentation("dreambooth", any_shape=True)
def _dreambooth(image: Image.Image, size: int | Size, vae_scale: int, gen: torch.Generator) -> Variant:
    size = as_size(size)
    return Variant(to_tensor(random_crop(resize_to_cover(image, size), size, gen)), None)


@augmentation("attn", any_shape=True)
def _attn(image: Image.Image, size: int | Size, vae_scale: int, gen: torch.Generator) -> Variant:
    size = as_size(size)
    if _uniform(gen) < 0.75:
        image = image.rotate(_uniform(gen, -45.0, 45.0), resample=Image.NEAREST, expand=True)
    image = flip(resize_to_cover(image, size), 0.25, gen)
    return Variant(to_tensor(random_crop(image, size, gen)), None)


@augmentation("custom_diffusion", worded=True)
def _custom_diffusion(image: Image.Image, size: int, vae_scale: int, gen: torch.Generator) -> Variant:
    return _random_rescale(flip(center_square(image), 0.5, gen), size, vae_scale, gen)


def _random_rescale(image: Image.Image, size: int, vae_scale: int, gen: torch.Generator) -> Variant:
    """`image` is the square crop; it is resized once (bicubic) to the drawn scale, as the released code does."""
    if _uniform(gen) < 2 / 3:
        scale = _randint(gen, size // 3, size)
    else:
        scale = _randint(gen, int(1.2 * size), int(1.4 * size))
    scale += scale % 2
    latent = size // vae_scale
    if scale < 0.6 * size:
        small = image.resize((scale, scale), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size), (128, 128, 128))  # zeros after scaling to [-1, 1], as released
        half = scale // 2
        cx, cy = _randint(gen, half, size - half), _randint(gen, half, size - half)
        canvas.paste(small, (cx - half, cy - half))
        mask = torch.zeros(1, latent, latent)
        x0, y0 = (cx - half) // vae_scale + 1, (cy - half) // vae_scale + 1
        x1, y1 = (cx + half) // vae_scale - 1, (cy + half) // vae_scale - 1
        mask[:, y0:y1, x0:x1] = 1.0
        prefix = "a far away " if _uniform(gen) < 0.5 else "very small "
        return Variant(to_tensor(canvas), mask, prefix)
    if scale > size:
        zoomed = random_crop(image.resize((scale, scale), Image.BICUBIC), (size, size), gen)
        prefix = "zoomed in " if _uniform(gen) < 0.5 else "close up "
        return Variant(to_tensor(zoomed), None, prefix)
    return Variant(to_tensor(image.resize((size, size), Image.BICUBIC)), None)


def plain(image: Image.Image, size: int | Size) -> Variant:
    """Class-prior images: resize to cover the shape and centre-crop, no randomness."""
    size = as_size(size)
    return Variant(to_tensor(center_crop(resize_to_cover(image, size), size)), None)
