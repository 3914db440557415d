"""Stable Diffusion components: load them (local folder, hub id, s3 uri) or build a tiny one offline."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from personalize.errors import ModelUnavailableError

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class SDComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    source: str
    path: Path
    # SDXL's second tokenizer and text encoder (OpenCLIP bigG as diffusers holds it); None for SD 1.x / 2.x
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_models(self) -> dict[str, torch.nn.Module]:
        """The text encoders by the name their parameters are selected under."""
        return {"text_encoder": self.text_encoder, **({"text_encoder_2": self.text_encoder_2} if self.is_sdxl else {})}

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """What a stage may train: the UNet and the text encoders."""
        return {"unet": self.unet, **self.text_models}

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.is_sdxl else [])


# --------------------------------------------------------------------------------------------
# Locating and loading


def resolve_model_path(model: str, cache_dir: str | None = None) -> Path:
    """A local diffusers folder for `model`: a folder as-is, an s3 uri downloaded once, a hub id from the cache/hub."""
    local = Path(model).expanduser()
    if local.is_dir():
        missing = [s for s in SUBFOLDERS if not (local / s).is_dir()]
        if missing:
            raise ModelUnavailableError(
                model, f"the folder lacks {missing}", "Pass a complete diffusers pipeline folder (see `personalize tiny-model`)."
            )
        return local
    if model.startswith("s3://"):
        from personalize.storage import download_prefix

        target = Path(cache_dir or _default_cache()) / "models" / model.removeprefix("s3://").replace("/", "__")
        return download_prefix(model, target)
    if model.startswith(("/", ".", "~")) or os.sep in model and model.count("/") != 1:
        raise ModelUnavailableError(model, "no such folder", "Pass an existing diffusers folder, an s3:// uri or a hub id.")
    return _hub_snapshot(model, cache_dir)


def _default_cache() -> str:
    return os.environ.get("PERSONALIZE_CACHE", str(Path.home() / ".cache" / "personalize"))


def _hub_snapshot(repo_id: str, cache_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*.json", "*.txt", "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise ModelUnavailableError(
            repo_id,
            "it is not in the local Hugging Face cache and the hub cannot be reached",
            "Pass a local diffusers folder (or an s3:// uri) as `model`; `personalize tiny-model DIR` builds a small "
            "one offline.",
        )
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as e:
        raise ModelUnavailableError(repo_id, f"download failed ({type(e).__name__}: {e})", "Check the id or pass a local folder.") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request instead of the hub client's minutes of retries."""
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        return True
    except Exception:
        return False


def load_components(model: str, cache_dir: str | None = None) -> SDComponents:
    path = resolve_model_path(model, cache_dir)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        tokenizer.model_max_length = 77
        fp32 = {"torch_dtype": torch.float32}  # weights may be stored in fp16; training and placement start from fp32
        second = {}
        if (path / "text_encoder_2").is_dir():  # SDXL
            second = {"tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                      "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                                    dtype=torch.float32)}
            second["tokenizer_2"].model_max_length = 77
        return SDComponents(
            tokenizer=tokenizer,
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **fp32),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **fp32),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            source=model,
            path=path,
            **second,
        )
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelUnavailableError(model, f"loading from {path} failed ({e})", "Check that it is a diffusers pipeline folder.") from None


# --------------------------------------------------------------------------------------------
# The real CLIP tokenizer, built offline


def clip_tokenizer(directory: str | Path | None = None, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The 49,408-token CLIP tokenizer of Stable Diffusion, from open_clip's bundled BPE merges. SD 1.x pads with
    end-of-text; SD 2.x's tokenizer pads with "!" (id 0)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token, model_max_length=77
        )
        if directory is not None:
            tokenizer.save_pretrained(directory)
    return tokenizer


# --------------------------------------------------------------------------------------------
# A tiny Stable Diffusion, built offline


@dataclass(frozen=True)
class TinyArch:
    """Sizes of a small SD-shaped model: the VAE downsamples x4 (64 px -> 16x16 latents); cross-attention at
    16x16 and 8x8 plus the mid block, with SD's module names. The SD 2.x fields give its layout: heads per block
    (2.1: 5/10/20/20), linear projections in the transformer blocks, OpenCLIP's gelu, "!" padding, v-prediction.
    The SDXL fields: a second text encoder (with a projection, its pooled output conditions the UNet with the
    added time ids), no attention in the first level, several transformer layers per block deeper down."""

    unet_channels: tuple[int, ...] = (32, 64)
    unet_heads: int | tuple[int, ...] = 4
    vae_channels: tuple[int, ...] = (16, 32, 32)
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 4
    sample_size: int = 16
    linear_projection: bool = False
    text_act: str = "quick_gelu"
    pad_token: str = "<|endoftext|>"
    prediction_type: str = "epsilon"
    text_width_2: int = 0  # SDXL: the second text encoder's width (0: none)
    attention_from_level: int = 0  # SDXL: the first level with cross-attention
    transformer_layers: int | tuple[int, ...] = 1
    addition_time_embed_dim: int = 8  # SDXL: per added time id


TINY_ARCHS = {
    "sd15": TinyArch(),
    "sd21": TinyArch(unet_channels=(40, 80), unet_heads=(5, 10), text_width=48, text_heads=4, linear_projection=True,
                     text_act="gelu", pad_token="!", prediction_type="v_prediction"),
    # the levels of SDXL at 1024 px (128, 64, 32 latents) at 64 px: attention from the second level on, two layers
    "sdxl": TinyArch(unet_channels=(32, 64, 64), unet_heads=(2, 4, 4), text_width=32, text_width_2=32,
                     linear_projection=True, attention_from_level=1, transformer_layers=(1, 1, 2)),
}


def tiny_unet(arch: TinyArch = TinyArch()) -> UNet2DConditionModel:
    n = len(arch.unet_channels)
    levels = range(n)
    sdxl = {}
    if arch.text_width_2:
        sdxl = {"addition_embed_type": "text_time", "addition_time_embed_dim": arch.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": 6 * arch.addition_time_embed_dim + arch.text_width_2,
                "transformer_layers_per_block": arch.transformer_layers}
    return UNet2DConditionModel(
        sample_size=arch.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=arch.unet_channels,
        layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if i >= arch.attention_from_level else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i >= arch.attention_from_level else "UpBlock2D" for i in reversed(levels)),
        cross_attention_dim=arch.text_width + arch.text_width_2,
        attention_head_dim=arch.unet_heads,
        use_linear_projection=arch.linear_projection,
        norm_num_groups=8,
        **sdxl,
    )


def tiny_vae(arch: TinyArch = TinyArch()) -> AutoencoderKL:
    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=arch.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=arch.sample_size * 2 ** (n - 1),
    )


def tiny_text_encoder(arch: TinyArch = TinyArch(), second: bool = False) -> CLIPTextModel:
    """The text encoder; `second`: SDXL's second one, with a projection (its pooled output) and "!" padding."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=arch.text_width_2 if second else arch.text_width,
        intermediate_size=(arch.text_width_2 if second else arch.text_width) * 2,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=77,
        hidden_act="gelu" if second else arch.text_act,
        projection_dim=arch.text_width_2 if second else arch.text_width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if second or arch.pad_token == "!" else 49407,
    )
    return CLIPTextModelWithProjection(config) if second else CLIPTextModel(config)


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_model(directory: str | Path, seed: int = 0, arch: TinyArch = TinyArch()) -> Path:
    """Write a complete random-weight SD pipeline (diffusers format) that `from_pretrained` loads: an SDXL one
    (StableDiffusionXLPipeline) when the arch has a second text encoder."""
    directory = Path(directory)
    torch.manual_seed(seed)
    parts = {"vae": tiny_vae(arch), "text_encoder": tiny_text_encoder(arch),
             "tokenizer": clip_tokenizer(pad_token=arch.pad_token), "unet": tiny_unet(arch),
             "scheduler": sd_scheduler(arch.prediction_type)}
    if arch.text_width_2:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=tiny_text_encoder(arch, second=True),
                                         tokenizer_2=clip_tokenizer(pad_token="!"))
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


FULL_SIZE_ARCHS = ("sd15", "sd21", "sdxl")


def full_size_unet(arch: str = "sd15") -> UNet2DConditionModel:
    """Random-weight UNet of a released architecture (same FLOPs and memory as the released weights): SD 1.5,
    SD 2.1-base (heads per block 5/10/20/20, linear projections, 1024-wide context), or SDXL 1.0 base (three levels,
    1/2/10 transformer layers, no attention in the first, 2048-wide context, pooled text and time ids)."""
    if arch == "sdxl":
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    if arch == "sd21":
        return UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                                    sample_size=64)
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)


def full_size_text_encoder(arch: str = "sd15") -> CLIPTextModel:
    """SD 1.5's CLIP ViT-L/14 text tower, or SD 2.x's OpenCLIP ViT-H/14 one as diffusers holds it (its penultimate
    layer as the last: 23 layers)."""
    wide = arch == "sd21"
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024 if wide else 768,
            intermediate_size=4096 if wide else 3072,
            num_hidden_layers=23 if wide else 12,
            num_attention_heads=16 if wide else 12,
            max_position_embeddings=77,
            hidden_act="gelu" if wide else "quick_gelu",
            projection_dim=1024 if wide else 768,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if wide else 49407,
        )
    )


def sdxl_text_encoder_2() -> CLIPTextModelWithProjection:
    """SDXL's second text tower: OpenCLIP ViT-bigG/14's (1280 wide, 32 layers, projected pooled output)."""
    return CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                       num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    )


def sd15_vae(sample_size: int = 512) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=sample_size,
    )


def build_full_size_model(directory: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """A random-weight pipeline folder of SD 1.5's, SD 2.1-base's or SDXL 1.0 base's architecture, for throughput
    and memory benchmarks (one VAE layout for all; 2.1-base predicts epsilon, as the papers' base). SDXL's is
    about 14 GB in fp32: build it where the benchmark runs."""
    torch.manual_seed(seed)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=sd15_vae(1024), text_encoder=full_size_text_encoder("sd15"), text_encoder_2=sdxl_text_encoder_2(),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"), unet=full_size_unet("sdxl"),
            scheduler=sd_scheduler())
        pipe.save_pretrained(directory, safe_serialization=True)
        return Path(directory)
    pipe = StableDiffusionPipeline(
        vae=sd15_vae(),
        text_encoder=full_size_text_encoder(arch),
        tokenizer=clip_tokenizer(pad_token="!" if arch == "sd21" else "<|endoftext|>"),
        unet=full_size_unet(arch),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
