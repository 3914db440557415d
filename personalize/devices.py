"""Which device a run uses and in which precision it computes."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. 'auto' is bf16 on a GPU that has it, fp32 on the CPU."""
    if mixed_precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
