"""What acts around a stage's updates without being the loop, registered like the loss terms: a factory sees the
run, the stage and the stage's saved state, and returns a hook, or None when the stage does not use it. A hook's
state is saved with every checkpoint, so a resumed stage continues with it; a hook that keeps tensors gives them
from `tensors()` and finds them again under the state's "tensors" key.

Optional parts of a hook: `tensors()`, `applied()` (a context in which the weights are the ones to sample and
validate, e.g. an EMA's) and `finish()` (after the stage's last update, before its checkpoint)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

from personalize import ema, faults, norm_lock


class StageHook(Protocol):
    def before_step(self, step: int) -> None: ...  # before the step's forward (0-based step)

    def after_update(self, step: int) -> None: ...  # after the optimizer's update number `step` (1-based)

    def state(self) -> dict: ...  # JSON-able, saved in the checkpoint's stage state


StageHookFactory = Callable[..., "StageHook | None"]
STAGE_HOOKS: dict[str, StageHookFactory] = {
    "embedding_norm_lock": norm_lock.from_stage,  # CoRe: hold the placeholder rows' joint norm in a window
    "ema": ema.from_stage,  # an exponential moving average of the trained weights, sampled and exported
    "fault_injection": faults.from_environment,  # tests of recovery and time limits only
}


def register_stage_hook(name: str, factory: StageHookFactory) -> None:
    STAGE_HOOKS[name] = factory


def build_hooks(ctx, stage, state: dict) -> list[StageHook]:
    return [hook for factory in STAGE_HOOKS.values() if (hook := factory(ctx, stage, state)) is not None]


def hooks_state(hooks: list[StageHook]) -> dict:
    return {key: value for hook in hooks for key, value in hook.state().items()}


def hooks_tensors(hooks: list[StageHook]) -> dict:
    return {key: value for hook in hooks if hasattr(hook, "tensors") for key, value in hook.tensors().items()}


@contextlib.contextmanager
def sampling_weights(hooks: list[StageHook]):
    """The weights sampling and validation should see while inside (an EMA's shadow), the trained ones after."""
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            if hasattr(hook, "applied"):
                stack.enter_context(hook.applied())
        yield


def finish_hooks(hooks: list[StageHook]) -> None:
    for hook in hooks:
        if hasattr(hook, "finish"):
            hook.finish()
