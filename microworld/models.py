"""Architectures of the micro world's models, small enough to train on two CPU cores."""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, ViTConfig, ViTModel

from microworld.world import SIZE


@dataclass(frozen=True)
class WorldArch:
    vae_channels: tuple[int, ...] = (16, 32, 64)  # x4 downsampling: 64 px -> 16x16 latents
    latent_channels: int = 8
    text_width: int = 48
    text_layers: int = 3
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (64, 96, 128)  # cross-attention at 16x16 and 8x8 (+ mid at 4x4)
    unet_heads: int = 4


def world_vae(arch: WorldArch = WorldArch()) -> AutoencoderKL:
    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=arch.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, latent_channels=arch.latent_channels, norm_num_groups=8,
        layers_per_block=1, sample_size=SIZE,
    )


def world_text_encoder(arch: WorldArch = WorldArch()) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=arch.text_width, intermediate_size=arch.text_width * 4,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads, max_position_embeddings=77,
        projection_dim=arch.text_width, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def world_unet(arch: WorldArch = WorldArch()) -> UNet2DConditionModel:
    n = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=SIZE // 2 ** (len(arch.vae_channels) - 1), in_channels=arch.latent_channels,
        out_channels=arch.latent_channels, block_out_channels=arch.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=arch.text_width, attention_head_dim=arch.unet_heads, norm_num_groups=16,
    )


def world_scheduler() -> DDIMScheduler:
    """DDPM's linear betas, not SD's scaled-linear ones: at 16x16 latents SD's schedule leaves the image's
    low frequencies visible at t = T (signal 0.068), so a model reads the background from the noise instead of
    the prompt and samples take their scene from the seed. Linear betas leave 0.006 there."""
    return DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="trailing", prediction_type="v_prediction")


CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SIZE, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3, "mlp_ratio": 2.0},
}
CLIP_PREPROCESS = {"image_size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                   "resize_mode": "shortest"}


def world_clip() -> open_clip.CLIP:
    return open_clip.CLIP(**CLIP_CONFIG)


def world_identity_encoder() -> ViTModel:
    """A small ViT, trained self-supervised (instance discrimination); scored like DINO (CLS token)."""
    return ViTModel(ViTConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=192,
                              image_size=SIZE, patch_size=8), add_pooling_layer=False)
