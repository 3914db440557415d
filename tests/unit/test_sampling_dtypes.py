"""Sampling runs under autocast only when the pipeline's modules are kept in different dtypes."""

from types import SimpleNamespace

import torch

from personalize.sampling import autocast_if_mixed


def pipe_of(*dtypes):
    modules = [SimpleNamespace(dtype=d, device=torch.device("cpu")) for d in dtypes]
    return SimpleNamespace(unet=modules[0], vae=modules[1], text_encoder=modules[2])


def test_modules_in_one_dtype_run_without_autocast():
    for dtype in (torch.float32, torch.bfloat16):
        with autocast_if_mixed(pipe_of(dtype, dtype, dtype)):
            assert not torch.is_autocast_enabled("cpu")


def test_a_trained_fp32_unet_beside_a_bf16_vae_runs_under_bf16_autocast():
    with autocast_if_mixed(pipe_of(torch.float32, torch.bfloat16, torch.bfloat16)):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
