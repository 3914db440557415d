"""Training the world's models by wall-clock budget: the budgeted loop, its schedule, a running loss and the log
that the model cards are written from."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Log:
    """Progress lines to stdout and a record of every part for the model cards."""

    records: dict = field(default_factory=dict)

    def say(self, part: str, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {part}: {text}", flush=True)


class RunningMean:
    """An exponential running mean of a loss, kept on its device: read back (a sync) only when printed."""

    def __init__(self, keep: float):
        self.keep, self.value = keep, None

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.value = loss if self.value is None else self.keep * self.value + (1 - self.keep) * loss

    def __float__(self) -> float:
        return float(self.value)


def update(opt: torch.optim.Optimizer, loss: torch.Tensor, running: RunningMean) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    running.add(loss)


def budget_loop(minutes: float, min_steps: int = 1):
    """(step, fraction of the time budget used) until the budget is spent (at least `min_steps` steps)."""
    began, step = time.perf_counter(), 0
    while True:
        used = (time.perf_counter() - began) / (minutes * 60)
        if step >= min_steps and used >= 1:
            return
        yield step, min(used, 1.0)
        step += 1


def cosine_lr(step: int, used: float, warmup: int, peak: float) -> float:
    """Linear warm-up over `warmup` steps, then a cosine to 10 % of `peak` over the time budget."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * used)))
