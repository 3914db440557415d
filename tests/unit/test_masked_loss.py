"""Masked loss for any method: a concept's masks go through its photos' augmentation and weight the denoising loss."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from personalize.data import instance_bank
from personalize.errors import ConceptError
from personalize.models import load_components
from personalize.run_context import prepare_run


def half_and_half(folder, n=2):
    """Photos whose left half is the red subject, and masks saying so."""
    (folder / "photos").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        photo = Image.new("RGB", (64 + 16 * i, 64), (30, 30, 200))
        photo.paste((220, 20, 20), (0, 0, photo.width // 2, 64))
        mask = Image.new("L", photo.size, 0)
        mask.paste(255, (0, 0, photo.width // 2, 64))
        photo.save(folder / "photos" / f"{i}.png")
        mask.save(folder / "masks" / f"{i}.png")
    return folder / "photos", folder / "masks"


@pytest.mark.parametrize("preset", ["ti", "dreambooth", "attn", "custom_diffusion"])
def test_each_mask_follows_its_photos_augmentation(preset, tiny_model, tmp_path):
    photos_dir, masks_dir = half_and_half(tmp_path)
    photos = [Image.open(p).convert("RGB") for p in sorted(photos_dir.iterdir())]
    masks = [Image.open(p) for p in sorted(masks_dir.iterdir())]
    vae = load_components(str(tiny_model)).vae
    plain = instance_bank(photos, preset, 64, 6, vae, 0, torch.device("cpu"), torch.float32)
    masked = instance_bank(photos, preset, 64, 6, vae, 0, torch.device("cpu"), torch.float32, masks)
    assert torch.equal(plain.mean, masked.mean)  # the same draws: the photos' variants are unchanged
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    assert masked.masks.shape == (12, 1, 64 // scale, 64 // scale)
    from personalize.augment import augment
    from personalize.data import generator

    for index in range(12):
        i, k = divmod(index, 6)
        pixels = augment(photos[i], preset, 64, scale, generator(0, "augment", i, k)).pixels
        red = ((pixels[0] > 0.5) & (pixels[2] < 0)).float()  # the subject's pixels in this variant
        red = torch.nn.functional.avg_pool2d(red[None], scale)[0]
        mask = masked.masks[index, 0]
        box = plain.masks[index, 0] if plain.masks is not None else torch.ones_like(mask)
        # the mask is the subject where the variant shows it (within one latent pixel's blur), inside any box
        assert torch.all(mask <= box + 1e-6)
        assert torch.all((mask - red * box).abs()[box > 0] < 0.51)
        assert mask.sum() < box.sum()


def test_a_masked_run_trains_and_a_missing_mask_is_the_concepts_error(spec_for, tiny_model, tmp_path):
    from personalize.loop import run_method

    photos, masks = half_and_half(tmp_path / "c")
    concept = {"id": "half", "images": str(photos), "super_category": "toy", "masks": str(masks)}
    spec = spec_for("dreambooth", concept=concept, masked_loss=True)
    ctx = prepare_run(spec, load_components(str(tiny_model)), progress=False)
    assert ctx.instances.masks is not None and 0.3 < float(ctx.instances.masks.mean()) < 0.7
    assert run_method(spec, progress=False).status == "finished"
    assert spec.config_hash() != spec_for("dreambooth", concept=concept).config_hash()

    (masks / "1.png").unlink()
    with pytest.raises(ConceptError, match=r"concept 'half'.*lacks masks for \['1.png'\]"):
        prepare_run(spec_for("textual_inversion", concept=concept, masked_loss=True), load_components(str(tiny_model)))
    no_folder = {k: v for k, v in concept.items() if k != "masks"}
    with pytest.raises(ConceptError, match="masked_loss is on but the concept has no masks folder"):
        prepare_run(spec_for("textual_inversion", concept=no_folder, masked_loss=True), load_components(str(tiny_model)))
