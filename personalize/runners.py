"""Which function trains a method's runs: the staged loop (personalize/loop.py), unless a plugin registered its
own for the method's name (a method trained by another tool, or pipelines/rehearsal.py's methods that train
nothing). A runner takes the arguments of `run_method` and returns a RunOutcome."""

from __future__ import annotations

from collections.abc import Callable

RUNNERS: dict[str, Callable] = {}


def register_runner(method: str, runner: Callable) -> None:
    RUNNERS[method] = runner


def runner_for(method: str) -> Callable:
    if method in RUNNERS:
        return RUNNERS[method]
    from personalize.loop import run_method

    return run_method
