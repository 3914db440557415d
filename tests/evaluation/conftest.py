"""Small randomly initialised CLIP and DINO encoders of the real architectures' kinds, built by the tests."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    import open_clip

    from personalize.metrics import save_open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    return save_open_clip(open_clip.CLIP(**cfg), cfg, tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino") / "dino"
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32, intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder
