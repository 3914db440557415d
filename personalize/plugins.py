"""Modules that register a method's own functions (loss terms, augmentation presets, optimizers, schedules, stage
hooks, extra forwards), named in PERSONALIZE_PLUGINS (comma-separated module names). The command line and every
Ray worker import them before a run starts, so a method needs no change to the project."""

from __future__ import annotations

import importlib
import os

from personalize.errors import ConfigError

VARIABLE = "PERSONALIZE_PLUGINS"


def load_plugins() -> list[str]:
    names = [n.strip() for n in os.environ.get(VARIABLE, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(VARIABLE, [f"cannot import {name!r} ({e}); put it on PYTHONPATH (on a cluster: in the "
                                         "job's working_dir or py_modules)"]) from None
    return names
