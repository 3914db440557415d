"""EMA of a stage's trained weights, as a stage hook (personalize/stage_hooks.py).

After every update the shadow moves toward the weights: shadow = decay x shadow + (1 - decay) x weights, starting
from the weights the stage begins with (a fixed decay, no warm-up). Whatever samples or exports sees the shadow:
validation points score it (and keep it as their checkpoint), and at the stage's end it replaces the weights, so
the stage-end checkpoint, the sample grids and the run's files are the EMA's. A mid-stage checkpoint keeps the live
weights and the shadow, so a resumed stage continues both."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from personalize.method_spec import StageSpec

PREFIX = "ema::"


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float, saved: dict[str, torch.Tensor] | None = None):
        self.params, self.decay = params, decay
        saved = saved or {}
        self.shadow = {name: (saved.get(PREFIX + name, p.detach())).to(p.device, torch.float32).clone()
                       for name, p in params.items()}

    def before_step(self, step: int) -> None:
        pass

    def after_update(self, step: int) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state(self) -> dict:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + name: value for name, value in self.shadow.items()}

    @contextmanager
    def applied(self):
        """The shadow in the weights for the duration (a validation point), the live weights back after."""
        live = {name: p.detach().clone() for name, p in self.params.items()}
        self._copy(self.shadow)
        try:
            yield
        finally:
            self._copy(live)

    def finish(self) -> None:
        self._copy(self.shadow)

    def _copy(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(values[name].to(p.dtype))


def from_stage(ctx, stage: StageSpec, state: dict) -> EMA | None:
    if stage.ema_decay is None:
        return None
    from personalize.params import stage_parameters

    return EMA(stage_parameters(ctx.models, stage), stage.ema_decay, state.get("tensors"))
