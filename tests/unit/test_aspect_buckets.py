"""Aspect-ratio buckets: non-square photos train at the shape nearest their aspect, and a batch holds one shape."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from personalize.augment import aspect_bucket, augment, plain
from personalize.data import Batcher, LatentBank, bucket_step, instance_bank, prior_bank, training_shapes
from personalize.models import load_components


class Fill:
    def fill(self, text: str) -> str:
        return text


def all_buckets(resolution: int, step: int) -> set[tuple[int, int]]:
    return {aspect_bucket(round(resolution * r), resolution, resolution, step) for r in (0.2, 0.5, 0.7, 1, 1.4, 2, 5)}


def test_sd_buckets_at_512_keep_area_step_and_ratio():
    buckets = all_buckets(512, 64)
    assert buckets == {(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)}
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2


@pytest.mark.parametrize("width,height,expected", [
    (512, 512, (512, 512)),
    (600, 400, (640, 384)),  # 1.5: 1.667 is nearer on a log scale than 1.286
    (1000, 770, (576, 448)),  # 1.30
    (400, 1200, (384, 640)),  # 1:3, beyond the widest bucket: the tallest one
    (64, 64, (512, 512)),  # the photo's own size does not matter, only its aspect ratio
])
def test_a_photo_gets_the_bucket_nearest_its_aspect(width, height, expected):
    assert aspect_bucket(width, height, 512, 64) == expected


def test_every_aspect_lands_within_the_bucket_grid_tolerance():
    buckets = sorted(all_buckets(512, 64), key=lambda b: b[0] / b[1])
    logs = [math.log(w / h) for w, h in buckets]
    half_gap = max(b - a for a, b in zip(logs, logs[1:])) / 2
    for ratio in torch.linspace(0.6, 1 / 0.6, 61).tolist():  # between the tallest and the widest bucket
        w, h = aspect_bucket(round(1000 * ratio), 1000, 512, 64)
        assert abs(math.log(w / h) - math.log(ratio)) <= half_gap + 1e-3


def test_the_world_resolution_has_three_buckets():
    assert all_buckets(64, 16) == {(48, 80), (64, 64), (80, 48)}


@pytest.mark.parametrize("preset", ["ti", "dreambooth", "attn"])
def test_presets_make_variants_of_the_bucket_shape(preset):
    photo = Image.new("RGB", (300, 200), (10, 200, 30))
    variant = augment(photo, preset, (80, 48), 4, torch.Generator().manual_seed(0))
    assert variant.pixels.shape == (3, 48, 80)
    assert plain(photo, (80, 48)).pixels.shape == (3, 48, 80)


def test_custom_diffusion_augmentation_refuses_a_non_square_shape():
    with pytest.raises(ValueError, match="custom_diffusion.*square variants only, not 80x48"):
        augment(Image.new("RGB", (90, 60)), "custom_diffusion", (80, 48), 4, torch.Generator())


def test_square_shapes_draw_exactly_what_the_square_size_draws():
    photo = Image.effect_noise((97, 71), 60).convert("RGB")
    for preset in ("ti", "dreambooth", "attn", "custom_diffusion"):
        a = augment(photo, preset, 64, 4, torch.Generator().manual_seed(3))
        b = augment(photo, preset, (64, 64), 4, torch.Generator().manual_seed(3))
        assert torch.equal(a.pixels, b.pixels)


def bucketed_bank(tiny_model, masks: bool = False):
    components = load_components(str(tiny_model))
    photos = [Image.effect_noise((64, 64), 50).convert("RGB"), Image.effect_noise((120, 70), 50).convert("RGB"),
              Image.effect_noise((130, 80), 50).convert("RGB")]
    step = bucket_step(components.vae, components.unet)
    shapes = training_shapes(photos, 64, step)
    mask_images = [Image.new("L", p.size, 255) for p in photos] if masks else None
    bank = instance_bank(photos, "dreambooth", shapes, 3, components.vae, 0, torch.device("cpu"), torch.float32,
                         mask_images)
    return components, photos, shapes, bank


def test_a_bank_of_several_shapes_keeps_each_items_shape(tiny_model, tmp_path):
    components, photos, shapes, bank = bucketed_bank(tiny_model, masks=True)
    scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
    assert shapes == [(64, 64), (80, 48), (80, 48)]
    assert [bank.shape_of(i) for i in range(len(bank))] == [(16, 16)] * 3 + [(12, 20)] * 6
    assert bank.mean.shape[-2:] == (16, 20)  # padded to the largest height and width
    assert bank.item_masks(bank.with_shape((12, 20))).shape == (6, 1, 12, 20)
    # the wide photo's latents equal encoding its variants alone
    alone = instance_bank(photos[1:2], "dreambooth", shapes[1:2], 3, components.vae, 0, torch.device("cpu"),
                          torch.float32)
    assert alone.shapes is None and alone.mean.shape[-2:] == (48 // scale, 80 // scale)
    bank.save(tmp_path / "b.safetensors")
    loaded = LatentBank.load(tmp_path / "b.safetensors")
    assert torch.equal(loaded.shapes, bank.shapes) and torch.equal(loaded.mean, bank.mean)


def test_batches_hold_one_shape_and_the_priors_match_it(tiny_model):
    components, photos, shapes, bank = bucketed_bank(tiny_model)
    priors = prior_bank([(Image.effect_noise((70, 70), 40).convert("RGB"), "a photo of a toy")] * 2,
                        sorted(set(shapes)), components.vae, torch.device("cpu"), torch.float32)
    assert sorted({priors.shape_of(i) for i in range(len(priors))}) == [(12, 20), (16, 16)]
    batcher = Batcher(bank, Fill(), ["a {placeholder}"], priors)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(60):
        batch = batcher.draw(3, gen, use_prior=True)
        assert batch.latents.shape[0] == 6 and batch.is_prior.tolist() == [False] * 3 + [True] * 3
        seen.append(tuple(batch.latents.shape[-2:]))
    # both shapes are drawn, about as often as their items: 3 square and 6 wide variants
    assert 0.15 < seen.count((16, 16)) / len(seen) < 0.55 and set(seen) == {(16, 16), (12, 20)}


def test_mixing_shapes_in_one_draw_is_refused(tiny_model):
    _, _, _, bank = bucketed_bank(tiny_model)
    with pytest.raises(ValueError, match="mixes latent shapes"):
        bank.sample(torch.tensor([0, 5]), torch.Generator())


def wide_photos(folder, n=3):
    folder.mkdir(parents=True)
    for i in range(n):
        photo = Image.new("RGB", (96 + 8 * i, 60), (30, 30, 200))
        photo.paste((220, 20, 20), (10, 10, 50, 50))
        photo.save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("method", ["dreambooth", "attndreambooth"])
def test_a_bucketed_run_trains_at_the_wide_shape(method, spec_for, tiny_model, tmp_path):
    from personalize.loop import run_method
    from personalize.run_context import prepare_run

    concept = {"id": "wide", "images": str(wide_photos(tmp_path / "wide")), "super_category": "toy"}
    spec = spec_for(method, concept=concept, aspect_buckets=True)
    ctx = prepare_run(spec, load_components(str(tiny_model)), progress=False)
    assert ctx.instances.shapes is None and ctx.instances.mean.shape[-2:] == (12, 20)  # 80x48 for all three
    if ctx.batcher.priors is not None:
        assert ctx.batcher.priors.mean.shape[-2:] == (12, 20)
    result = run_method(spec, progress=False)
    assert result.status == "finished"
    assert LatentBank.load(spec.run_dir / "instance_latents.safetensors").mean.shape[-2:] == (12, 20)
    assert spec.config_hash() != spec_for(method, concept=concept).config_hash()
    assert "aspect_buckets" not in spec_for(method, concept=concept).model_dump(exclude_defaults=True)


@pytest.mark.parametrize("method", ["custom_diffusion", "disendiff"])
def test_buckets_with_a_square_only_augmentation_is_a_config_error(method, spec_for):
    from personalize.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"(?s)method {method}: 1 problem.*aspect_buckets: its augmentation "
                                          r"\(custom_diffusion\) makes square images only"):
        spec_for(method, aspect_buckets=True)


def test_buckets_refuse_a_mixed_prior_mode_and_a_resolution_off_the_step(spec_for, tiny_model, tmp_path):
    from personalize.errors import ConfigError
    from personalize.run_context import prepare_run

    with pytest.raises(ConfigError, match=r"(?s)method dreambooth: 1 problem.*class_prior.mode: mixed"):
        spec_for("dreambooth", aspect_buckets=True, overrides={"class_prior.mode": "mixed"})
    concept = {"id": "wide", "images": str(wide_photos(tmp_path / "wide")), "super_category": "toy"}
    spec = spec_for("textual_inversion", concept=concept, aspect_buckets=True, resolution=68)
    with pytest.raises(ConfigError, match="resolution 68 is not a multiple of 8 px.*use 64"):
        prepare_run(spec, load_components(str(tiny_model)), progress=False)
