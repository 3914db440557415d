"""Test-only faults, for tests of recovery and time limits: set in the environment (so that they reach Ray
workers), read once when a stage starts, and active only when set.

    PERSONALIZE_INJECT_FAULT=<stage>:<step>:<marker file>   raise once at that step (the marker records it)
    PERSONALIZE_INJECT_CRASH=<concept>:<stage>:<step>        raise at that step of that concept's runs, every time
    PERSONALIZE_INJECT_HANG=<stage>:<step>                   block there
    PERSONALIZE_INJECT_HANG=<stage>:<step>:<folder>          the first time a concept's run gets there, write
                                                             <folder>/<concept>.hang (its process id) and wait for
                                                             <folder>/<concept>.release; pass on later times
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class InjectedFault(RuntimeError):
    """Raised once by PERSONALIZE_INJECT_FAULT."""


class FaultInjection:
    def __init__(self, stage: str, fault: str | None, hang: str | None, concept: str = "", crash: str | None = None):
        self.stage, self.fault, self.hang, self.concept, self.crash = stage, fault, hang, concept, crash

    def before_step(self, step: int) -> None:
        if self.crash and self.crash.split(":") == [self.concept, self.stage, str(step)]:
            raise InjectedFault(f"injected crash of {self.concept} at {self.stage} step {step}")
        if self.fault:
            name, at, marker = self.fault.split(":", 2)
            if name == self.stage and int(at) == step and not Path(marker).exists():
                Path(marker).write_text("fault injected\n")
                raise InjectedFault(f"injected fault at {self.stage} step {step}")
        if self.hang:
            name, at, *folder = self.hang.split(":", 2)
            if name == self.stage and int(at) == step:
                self._hang(Path(folder[0]) if folder else None)

    def _hang(self, folder: Path | None) -> None:
        if folder is None:
            time.sleep(24 * 3600)
            return
        marker, release = folder / f"{self.concept}.hang", folder / f"{self.concept}.release"
        if marker.exists():
            return
        marker.write_text(f"{os.getpid()}\n")
        while not release.exists():
            time.sleep(0.2)

    def after_update(self, step: int) -> None:
        pass

    def state(self) -> dict:
        return {}


def from_environment(ctx, stage, state: dict) -> FaultInjection | None:
    fault, hang = os.environ.get("PERSONALIZE_INJECT_FAULT"), os.environ.get("PERSONALIZE_INJECT_HANG")
    crash = os.environ.get("PERSONALIZE_INJECT_CRASH")
    return FaultInjection(stage.name, fault, hang, ctx.spec.concept.id, crash) if fault or hang or crash else None
