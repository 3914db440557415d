"""What the Ray commands (`personalize batch`, `personalize sweep`) share around their work: a usage with
examples, our logging, and bad input reported as one readable line (secrets redacted) with exit status 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import nullcontext

from personalize.errors import PersonalizeError
from personalize.plugins import load_plugins
from personalize.quiet import quiet_libraries
from pipelines.stderr_filter import filtered_stderr


def config_parser(prog: str, description: str, examples: list[str], config_help: str, overrides_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray's worker logs and the libraries' notices here too")
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help=overrides_help)
    return parser


INTERRUPTED = 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_command(work: Callable[[], int], verbose: bool = False) -> int:
    """`work()`'s exit status; bad input is status 2, an interrupt (Ctrl-C, or SIGTERM) stops our local Ray and is
    status 130 with how to resume."""
    from pipelines.cluster import setup_logging
    from pipelines.redaction import redact

    if verbose:
        os.environ["PERSONALIZE_VERBOSE"] = "1"
    else:
        quiet_libraries()  # the driver loads models too (identity floors, the registry)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported: no database set-up notes
    setup_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        load_plugins()
        with nullcontext() if verbose else filtered_stderr():
            return work()
    except PersonalizeError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept, and a run stopped part-way keeps its last stage checkpoint; run "
              "the same command again to resume", file=sys.stderr, flush=True)
        import ray

        ray.shutdown()  # a local Ray started here stops with it
        return INTERRUPTED
