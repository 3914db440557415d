"""Scorers: identical images score 1, order does not matter, hand-computed pairs, the DINO feature, clear errors."""

import time

import pytest
import torch
from PIL import Image

from personalize.errors import ModelUnavailableError
from personalize.metrics import ClipScorer, DinoScorer, apply_mask, pairwise_mean, per_row_mean


def images(n=3):
    return [Image.new("RGB", (48 + 8 * i, 48), (40 * i, 200 - 30 * i, 90)) for i in range(n)]


def test_pairwise_mean_on_a_hand_computed_2x2_example():
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    real = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    # cosines: g0.r0 = 1/sqrt2, g0.r1 = 1, g1.r0 = 1/sqrt2, g1.r1 = 0  -> mean (2/sqrt2 + 1) / 4
    assert pairwise_mean(gen, real) == pytest.approx((2 / 2**0.5 + 1) / 4)
    assert per_row_mean(gen, real).tolist() == pytest.approx([(1 / 2**0.5 + 1) / 2, (1 / 2**0.5) / 2])


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_identical_images_score_one_and_order_does_not_matter(kind, tiny_clip, tiny_dino):
    scorer = ClipScorer(str(tiny_clip)) if kind == "clip" else DinoScorer(str(tiny_dino))
    ims = images()
    feats = scorer.image_features(ims)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert pairwise_mean(scorer.image_features([ims[0]]), scorer.image_features([ims[0]])) == pytest.approx(1.0, abs=1e-5)
    shuffled = scorer.image_features(ims[::-1])
    real = scorer.image_features(images(2))
    assert pairwise_mean(feats, real) == pytest.approx(pairwise_mean(shuffled, real), abs=1e-6)
    assert pairwise_mean(feats, real) == pytest.approx(pairwise_mean(real, feats), abs=1e-6)


def test_dino_feature_is_the_cls_token_of_the_last_hidden_state(tiny_dino):
    scorer = DinoScorer(str(tiny_dino))
    im = images(1)
    with torch.no_grad():
        out = scorer.model(pixel_values=scorer.preprocess(im[0])[None])
    expected = torch.nn.functional.normalize(out.last_hidden_state[:, 0], dim=-1)
    assert torch.allclose(scorer.image_features(im), expected, atol=1e-6)
    assert scorer.model.pooler is None


def test_clip_text_features_are_normalised(tiny_clip):
    t = ClipScorer(str(tiny_clip)).text_features(["a dog on the beach", "a red car"])
    assert t.shape == (2, 32) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_masks_keep_only_the_foreground():
    im = Image.new("RGB", (4, 4), (200, 100, 50))
    mask = Image.new("L", (4, 4), 0)
    mask.putpixel((1, 1), 255)
    out = apply_mask(im, mask)
    assert out.getpixel((1, 1)) == (200, 100, 50) and out.getpixel((0, 0)) == (0, 0, 0)


def test_unreachable_default_weights_fail_fast_naming_the_model_and_the_fix():
    began = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"'ViT-B-32/openai'.*--clip PATH"):
        ClipScorer("ViT-B-32/openai")
    with pytest.raises(ModelUnavailableError, match=r"'facebook/dino-vits16'.*--dino PATH"):
        DinoScorer("facebook/dino-vits16")
    assert time.perf_counter() - began < 30


def test_a_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelUnavailableError, match="open_clip_model.safetensors"):
        ClipScorer(str(tmp_path))


def test_a_missing_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"no such folder.*save_open_clip"):
        ClipScorer(str(tmp_path / "absent" / "clip"))
