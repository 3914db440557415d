"""The `personalize` command. Its Ray subcommands (batch, sweep, stack, demo) are dispatched here, above the layers
they use; every other subcommand is personalize/cli.py's, which imports nothing of Ray, MLflow, pipelines or tuning."""

from __future__ import annotations

import importlib
import sys

from personalize import cli

RAY_COMMANDS = {  # subcommand -> (module with main(argv), help)
    "batch": ("pipelines.batch", "the concept x method grid on Ray: prepare, train, evaluate, results table"),
    "sweep": ("tuning.sweep", "Ray Tune over stage lengths, learning rates and loss weights of one method"),
    "stack": ("pipelines.stack", "the local stack on 127.0.0.1: SeaweedFS (S3), MLflow server, Ray head"),
    "demo": ("pipelines.demo", "the demo batch on the micro world: draw concepts, train three methods on Ray, "
                               "evaluate, print the results table"),
}


def _entry(module: str):
    return lambda argv: importlib.import_module(module).main(argv)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, {name: (help_text, _entry(module)) for name, (module, help_text) in RAY_COMMANDS.items()})


if __name__ == "__main__":
    sys.exit(main())
