"""Loading models: the tiny pipeline is complete and standard; unreachable weights fail fast and say what to do."""

import time

import pytest
import torch
from diffusers import StableDiffusionPipeline

from personalize.attention import CaptureSpec, attention_hooks
from personalize.errors import ModelUnavailableError
from personalize.models import load_components


def test_the_tiny_model_is_a_standard_diffusers_pipeline(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    assert pipe.text_encoder.config.vocab_size == 49408 and len(pipe.tokenizer) == 49408
    assert pipe.tokenizer.model_max_length == 77
    names = [n for n in pipe.unet.attn_processors if ".attn2." in n]
    assert len(names) == 7
    with torch.no_grad(), attention_hooks(pipe.unet, CaptureSpec()) as store:
        with store.recording(CaptureSpec(), (16, 16)):
            pipe.unet(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.randn(1, 77, 32))
    assert sorted({h for h, _ in store.resolutions.values()}) == [8, 16]  # cross-attention at two resolutions


def test_a_hub_id_that_cannot_be_reached_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    began = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"'someone/not-cached-sd'.*local diffusers folder"):
        load_components("someone/not-cached-sd")
    assert time.perf_counter() - began < 10


def test_an_incomplete_folder_says_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelUnavailableError, match=r"lacks \['tokenizer', 'text_encoder', 'vae', 'scheduler'\]"):
        load_components(str(tmp_path))
    with pytest.raises(ModelUnavailableError, match="no such folder"):
        load_components(str(tmp_path / "nowhere" / "model"))
