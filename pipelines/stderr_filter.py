"""Known Ray lines kept off the terminal where no Python setting reaches them.

Ray 2.60's driver prints, from C++ straight to file descriptor 2, one error-level line per Ray Data actor: "Actor
... has constructor arguments in the object store and max_restarts > 0" (ray#53727; every actor pool passes its
data context and transform by reference, and Ray Data restarts actors by default). The line is harmless here (the
driver holds those references for the pool's life) and Ray keeps it in the session's python-core-driver log.
Without -v a command's file descriptor 2 goes through a pipe that drops exactly such lines and passes everything
else through unchanged, as it arrives.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

RAY_ACTOR_ARGUMENTS_NOTICE = re.compile(
    rb"^\[[^\]\n]*\] core_worker\.cc:\d+: Actor with class name: [^\n]* has constructor arguments in the object "
    rb"store and max_restarts > 0\.[^\n]*\n?", re.MULTILINE)
_DRAINED = b"\0personalize-stderr-filter-drained\0"


def drop_known_lines(chunk: bytes, pattern: re.Pattern[bytes] = RAY_ACTOR_ARGUMENTS_NOTICE) -> bytes:
    return pattern.sub(b"", chunk)


@contextmanager
def filtered_stderr(pattern: re.Pattern[bytes] = RAY_ACTOR_ARGUMENTS_NOTICE) -> Iterator[None]:
    """File descriptor 2 (Python's stderr and C++ code's alike) without the lines `pattern` matches, inside the
    block. Processes started inside keep writing through the filter after it ends (it reads until they close)."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    drained = threading.Event()

    def pump() -> None:
        open_terminal = True
        while chunk := os.read(read_end, 65536):
            reached_end = _DRAINED in chunk
            chunk = drop_known_lines(chunk.replace(_DRAINED, b""), pattern)
            while open_terminal and chunk:
                try:
                    chunk = chunk[os.write(terminal, chunk):]
                except OSError:  # the reader is gone (a closed pipe or terminal): keep draining, so writers never block
                    open_terminal = False
            if reached_end:  # only once what came before the marker is written out
                drained.set()
        os.close(read_end)
        os.close(terminal)

    os.dup2(write_end, 2)
    threading.Thread(target=pump, name="stderr-filter", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.write(write_end, _DRAINED)  # everything written before it has reached the terminal once it is read
        os.close(write_end)
        drained.wait(timeout=5)
