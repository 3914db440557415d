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


def test_the_sd21_tiny_model_has_sd2s_layout_and_padding(tiny_models, tmp_path):
    from personalize.cli import main
    from personalize.method_spec import PlaceholderSpec
    from personalize.run_settings import ConceptSpec
    from personalize.tokens import add_placeholders, find_roles, tokenize

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd21"]))
    assert pipe.unet.config.use_linear_projection and list(pipe.unet.config.attention_head_dim) == [5, 10]
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.tokenizer.pad_token == "!" and pipe.tokenizer.pad_token_id == 0
    ids = tokenize(pipe.tokenizer, ["a photo of a dog"])
    assert ids[0, 6] == pipe.tokenizer.eos_token_id and (ids[0, 7:] == 0).all()  # padded with "!", not end-of-text
    comps = load_components(str(tiny_models["sd21"]))
    placeholders = add_placeholders(comps.tokenizer, comps.text_encoder, PlaceholderSpec(),
                                    ConceptSpec(id="c", images="x", super_category="dog"))
    roles = find_roles(tokenize(comps.tokenizer, [placeholders.fill("a photo of a {placeholder} {super_category}")]),
                       placeholders, [comps.tokenizer.convert_tokens_to_ids("dog</w>")])
    assert int(roles.super_category[0, 0]) == int(roles.placeholder[0, 0]) + 1 == 6  # "<c>" at 5, "dog" at 6
    assert main(["tiny-model", str(tmp_path / "m"), "--arch", "sd21"]) == 0
    assert (tmp_path / "m" / "unet" / "config.json").read_text() == (tiny_models["sd21"] / "unet" / "config.json").read_text()


def test_the_sdxl_tiny_model_has_sdxls_layout_and_loads_with_its_pipeline(tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from personalize.cli import main

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_models["sdxl"]))
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == 64  # both encoders side by side
    assert unet.down_block_types[0] == "DownBlock2D" and list(unet.transformer_layers_per_block) == [1, 1, 2]
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + 32  # time ids + pooled
    assert pipe.text_encoder_2.config.projection_dim == 32 and pipe.tokenizer_2.pad_token == "!"
    comps = load_components(str(tiny_models["sdxl"]))
    assert comps.is_sdxl and list(comps.models) == ["unet", "text_encoder", "text_encoder_2"]
    assert not load_components(str(tiny_models["sd15"])).is_sdxl
    assert main(["tiny-model", str(tmp_path / "m"), "--arch", "sdxl"]) == 0
    assert (tmp_path / "m" / "unet" / "config.json").read_text() == (tiny_models["sdxl"] / "unet" / "config.json").read_text()


def test_the_full_size_sdxl_has_the_released_parameter_counts():
    """Built on the meta device (nothing allocated): the benchmarks' random SDXL is the released architecture."""
    from personalize.models import full_size_unet, sdxl_text_encoder_2

    with torch.device("meta"):
        unet, second = full_size_unet("sdxl"), sdxl_text_encoder_2()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL 1.0 base UNet
    assert sum(p.numel() for p in second.parameters()) == 694_659_840  # its OpenCLIP ViT-bigG/14 text tower
