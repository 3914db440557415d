"""How one (concept, method) run ended, whoever ran it (`personalize train`, a batch's Ray Train run, a sweep's
trial): finished now, skipped (finished before with this configuration), or failed with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from personalize.run_settings import RunSpec


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str  # finished | skipped | failed
    reason: str = ""
    seconds: float = 0.0  # wall time of this attempt
    stage_seconds: dict[str, float] = field(default_factory=dict)  # training time of each stage (recorded when it ran)
    last_losses: dict[str, float] = field(default_factory=dict)  # the last logged loss terms of the last stage
    outputs: list[str] = field(default_factory=list)  # files written in the run folder

    @property
    def concept(self) -> str:
        return self.spec.concept.id

    @property
    def method(self) -> str:
        return self.spec.method.name

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir
