"""Attention heat maps you can look at: where the placeholder and its class word attend while generating.

Maps are captured from every cross-attention layer during one sampling run, averaged over denoising
steps, heads and layers (each upsampled to the finest resolution), as the AttnDreamBooth slides show them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from personalize.attention import CaptureSpec, MapAccumulator, attention_hooks
from personalize.prompts import templates
from personalize.sampling import build_pipeline, generate
from personalize.tokens import find_roles, tokenize


def token_maps(components, prompt: str, positions: dict[str, int], seed: int, resolution: int, steps: int,
               guidance_scale: float, scheduler: str = "ddim") -> tuple[Image.Image, dict[str, torch.Tensor]]:
    """Generate one image and return it with each labelled token's averaged map, scaled to [0, 1]."""
    pipe = build_pipeline(components, scheduler)
    store = MapAccumulator(CaptureSpec(), conditional_half=guidance_scale > 1.0)
    with attention_hooks(components.unet, CaptureSpec(), store=store):
        (image,) = generate(pipe, [prompt], [seed], resolution, steps, guidance_scale)
    layers = store.averaged()
    side = max(h for h, _ in store.resolutions.values())
    stacked = []
    for name, m in layers.items():
        h, w = store.resolutions[name]
        grid = m[0].T.reshape(-1, 1, h, w)  # (K, 1, h, w)
        stacked.append(F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[:, 0])
    mean = torch.stack(stacked).mean(0)  # (K, side, side)
    out = {}
    for label, pos in positions.items():
        m = mean[pos]
        out[label] = (m - m.min()) / (m.max() - m.min() + 1e-8)
    return image, out


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """The map as a red-yellow overlay on a darkened copy of the image."""
    size = image.size
    h = np.asarray(Image.fromarray((heat.cpu().numpy() * 255).astype(np.uint8)).resize(size, Image.BILINEAR), dtype=np.float32) / 255
    base = np.asarray(image, dtype=np.float32) * 0.35
    colour = np.stack([h, h**2, np.zeros_like(h)], -1) * 255 * 0.65
    return Image.fromarray(np.clip(base + colour, 0, 255).astype(np.uint8))


def panel(image: Image.Image, maps: dict[str, torch.Tensor], title: str, scale: int = 2) -> Image.Image:
    tiles = [image] + [overlay(image, m) for m in maps.values()]
    labels = ["sample"] + list(maps)
    w, h = image.size[0] * scale, image.size[1] * scale
    canvas = Image.new("RGB", (w * len(tiles), h + 28), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title[:120], fill=(0, 0, 0))
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        canvas.paste(tile.resize((w, h), Image.NEAREST), (i * w, 28))
        draw.text((i * w + 2, 15), label[:24], fill=(0, 0, 0))
    return canvas


def subject_positions(tokenizer, placeholders, class_ids, prompt: str) -> dict[str, int]:
    roles = find_roles(tokenize(tokenizer, [prompt]), placeholders, class_ids)
    positions = {}
    for j, string in enumerate(placeholders.strings):
        if int(roles.placeholder[0, j]) >= 0:
            positions[string] = int(roles.placeholder[0, j])
        if int(roles.super_category[0, j]) >= 0:
            positions[placeholders.super_categories[j]] = int(roles.super_category[0, j])
    return positions


def write_stage_heatmaps(ctx, index: int, stage_name: str) -> Path | None:
    """attention/stage-<i>-<name>.png: a sample of the training prompt and its subject tokens' maps."""
    spec = ctx.spec
    prompt = ctx.placeholders.fill(templates(spec.method.prompt)[0])
    positions = subject_positions(ctx.components.tokenizer, ctx.placeholders, ctx.class_ids, prompt)
    if not positions:
        return None
    image, maps = token_maps(ctx.components, prompt, positions, spec.samples.seeds[0], spec.resolution,
                             spec.samples.steps, spec.samples.guidance_scale, spec.samples.scheduler)
    path = ctx.run_dir / "attention" / f"stage-{index:02d}-{stage_name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    panel(image, maps, f"after stage {index + 1} ({stage_name}): {prompt}").save(path)
    return path
