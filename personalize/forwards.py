"""Extra forward work of a training step, registered like the loss terms: each entry says when a stage's
combined needs want it and fills its part of the step record. A new method that needs another forward (another
prompt pair, reference maps) adds an entry here instead of editing the step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from personalize import context_forward
from personalize.step_record import Needs


@dataclass(frozen=True)
class ExtraForward:
    wanted: Callable[[Needs], bool]
    run: Callable[..., None]  # (engine, record, noisy latents, timesteps, generator) -> None; fills the record


EXTRA_FORWARDS: dict[str, ExtraForward] = {
    "context": ExtraForward(lambda needs: needs.context, context_forward.context_forward),  # CoRe
}


def register_forward(name: str, wanted: Callable[[Needs], bool], run: Callable[..., None]) -> None:
    EXTRA_FORWARDS[name] = ExtraForward(wanted, run)
