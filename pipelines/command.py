"""What the Ray commands (`personalize batch`, `personalize sweep`) share around their work: a usage with
examples, our logging, and bad input reported as one readable line (secrets redacted) with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from personalize.errors import PersonalizeError
from personalize.plugins import load_plugins


def config_parser(prog: str, description: str, examples: list[str], config_help: str, overrides_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser


def run_command(work: Callable[[], int]) -> int:
    from pipelines.cluster import setup_logging
    from pipelines.redaction import redact

    setup_logging()
    try:
        load_plugins()
        return work()
    except PersonalizeError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
