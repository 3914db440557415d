"""Optimizers and learning-rate schedules, by name: a stage's YAML picks them (`optimizer: adamw`,
`lr_schedule: cosine`); a new one is one registered function."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch


class StageSpec(Protocol):
    """What the optimizers and schedules read of a stage (personalize/method_spec.py StageSpec)."""

    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    adam_betas: tuple[float, float]
    adam_eps: float
    optimizer: str
    lr_schedule: str

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], StageSpec], torch.optim.Optimizer]] = {}
SCHEDULES: dict[str, Callable[[StageSpec, int], float]] = {}


def optimizer(name: str):
    def add(fn):
        OPTIMIZERS[name] = fn
        return fn

    return add


def schedule(name: str):
    def add(fn):
        SCHEDULES[name] = fn
        return fn

    return add


@optimizer("adamw")
def adamw(params: list[torch.nn.Parameter], stage: StageSpec) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=stage.lr, betas=stage.adam_betas, eps=stage.adam_eps,
                             weight_decay=stage.weight_decay, fused=fused or None)


@optimizer("adamw8bit")
def adamw8bit(params: list[torch.nn.Parameter], stage: StageSpec) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW: both moments in 8 bits, about a quarter of AdamW's optimizer memory (for
    whole-UNet stages on a small GPU). CUDA only, and bitsandbytes is not a dependency: install it to use this."""
    from personalize.errors import ConfigError

    where = f"stage {getattr(stage, 'name', '?')}"
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(where, ["optimizer adamw8bit needs bitsandbytes, which is not installed: `pip install "
                                  "bitsandbytes` on a CUDA machine, or use optimizer: adamw"]) from None
    if not all(p.is_cuda for p in params):
        raise ConfigError(where, [f"optimizer adamw8bit runs on CUDA GPUs only; this run trains on "
                                  f"{params[0].device.type}: use optimizer: adamw"])
    return bitsandbytes.optim.AdamW8bit(params, lr=stage.lr, betas=stage.adam_betas, eps=stage.adam_eps,
                                        weight_decay=stage.weight_decay)


@optimizer("sgd")
def sgd(params: list[torch.nn.Parameter], stage: StageSpec) -> torch.optim.Optimizer:
    """Plain SGD with momentum adam_betas[0] (a baseline for sweeps)."""
    return torch.optim.SGD(params, lr=stage.lr, momentum=stage.adam_betas[0], weight_decay=stage.weight_decay)


def _warmup(stage: StageSpec, step: int) -> float | None:
    """The linear warmup's rate at `step` (0-based), None past the warmup."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    return None


@schedule("constant")
def constant(stage: StageSpec, step: int) -> float:
    """The papers' default: constant after an optional linear warmup."""
    warm = _warmup(stage, step)
    return stage.lr if warm is None else warm


@schedule("cosine")
def cosine(stage: StageSpec, step: int) -> float:
    """Linear warmup, then half a cosine from lr towards 0 over the rest of the stage (as diffusers' cosine)."""
    warm = _warmup(stage, step)
    if warm is not None:
        return warm
    span = max(1, stage.steps - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    return stage.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[torch.nn.Parameter], stage: StageSpec) -> torch.optim.Optimizer:
    return OPTIMIZERS[stage.optimizer](params, stage)


def lr_at(stage: StageSpec, step: int) -> float:
    return SCHEDULES[stage.lr_schedule](stage, step)
