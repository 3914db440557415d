"""Errors that tell the user what went wrong, where, and how to fix it."""

from __future__ import annotations


class PersonalizeError(Exception):
    """Base class of every error raised on bad user input or an unreachable resource."""


class ConfigError(PersonalizeError):
    """A configuration file or override is invalid. `problems` lists every problem found at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class ConceptError(PersonalizeError):
    """One concept cannot be trained. Names the concept so a batch can report it and go on."""

    def __init__(self, concept_id: str, reason: str, fix: str = ""):
        self.concept_id = concept_id
        self.reason = reason
        self.fix = fix
        message = f"concept '{concept_id}': {reason}"
        if fix:
            message += f" (fix: {fix})"
        super().__init__(message)


class ModelUnavailableError(PersonalizeError):
    """Model weights cannot be reached (offline, wrong path, missing files)."""

    def __init__(self, model: str, reason: str, fix: str):
        self.model = model
        super().__init__(f"model '{model}' is unavailable: {reason}. {fix}")


class RunStateError(PersonalizeError):
    """An output folder holds state that does not belong to this configuration."""
