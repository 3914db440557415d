"""Augmentation presets and cached latents: deterministic per seed, the presets' documented behaviour."""

import torch
from PIL import Image

from personalize.augment import augment
from personalize.data import LatentBank, generator


def photo():
    im = Image.new("RGB", (120, 80), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 60, 80))  # left half white
    return im


def test_presets_are_deterministic_per_generator():
    for preset in ("ti", "dreambooth", "attn", "custom_diffusion"):
        a = augment(photo(), preset, 64, 4, generator(1, preset))
        b = augment(photo(), preset, 64, 4, generator(1, preset))
        assert torch.equal(a.pixels, b.pixels) and a.caption_prefix == b.caption_prefix
        assert a.pixels.shape == (3, 64, 64) and a.pixels.min() >= -1 and a.pixels.max() <= 1


def test_dreambooth_preset_never_flips_and_ti_squashes():
    for seed in range(20):
        v = augment(photo(), "dreambooth", 64, 4, generator(seed))
        assert v.pixels[:, :, 0].mean() >= v.pixels[:, :, -1].mean()  # white stays on the left
    ti = augment(Image.new("RGB", (128, 32), (255, 0, 0)), "ti", 64, 4, generator(0))
    assert torch.allclose(ti.pixels[0], torch.ones(64, 64))  # aspect not kept: whole frame is the image


def test_custom_diffusion_small_scale_pastes_with_mask_and_caption():
    seen = {"far": 0, "zoom": 0, "plain": 0}
    for seed in range(60):
        v = augment(Image.new("RGB", (64, 64), (255, 255, 255)), "custom_diffusion", 64, 4, generator(seed))
        if v.mask is not None:
            seen["far"] += 1
            assert v.caption_prefix in ("a far away ", "very small ")
            assert v.mask.shape == (1, 16, 16) and 0 < v.mask.sum() < 16 * 16
            assert (v.pixels.abs().max(0).values < 0.01).any()  # a mid-grey canvas around (0 after scaling)
        elif v.caption_prefix:
            seen["zoom"] += 1
            assert v.caption_prefix in ("zoomed in ", "close up ")
        else:
            seen["plain"] += 1
    assert all(n > 3 for n in seen.values()), seen


def test_latent_bank_samples_fresh_noise_around_the_cached_posterior(tmp_path):
    bank = LatentBank(torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8), ["", "close up "], None, scaling_factor=0.5)
    a = bank.sample(torch.tensor([0, 1]), generator(0))
    b = bank.sample(torch.tensor([0, 1]), generator(1))
    assert not torch.equal(a, b) and torch.equal(a, bank.sample(torch.tensor([0, 1]), generator(0)))
    assert abs(a.std().item() - 0.5) < 0.1
    bank.save(tmp_path / "b.safetensors")
    loaded = LatentBank.load(tmp_path / "b.safetensors")
    assert loaded.captions == ["", "close up "] and loaded.scaling_factor == 0.5 and torch.equal(loaded.std, bank.std)
