"""A local Ray that a driver started is stopped when that driver ends, however it ends: `connect()` starts this
small watcher beside it, and when the driver's process is gone (killed, crashed, or simply finished without
Ray's own shutdown) the watcher ends every process of that Ray session and its children.

    python -m pipelines.reaper <driver pid> <session dir>
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil


def session_processes(session_dir: str) -> list[psutil.Process]:
    """The session's processes (their command lines name its folder) and every process below them."""
    roots, me = [], os.getpid()  # the watcher names the session too
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != me and any(session_dir in part for part in proc.info["cmdline"] or []):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    found.pop(me, None)
    return list(found.values())


def stop(processes: list[psutil.Process], grace_s: float = 5.0) -> int:
    for proc in processes:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return len(processes)


def watch(driver_pid: int, session_dir: str, poll_s: float = 1.0) -> int:
    while psutil.pid_exists(driver_pid) and psutil.Process(driver_pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(poll_s)
    time.sleep(poll_s)  # a driver that shut Ray down itself has left nothing: nothing is found then
    return stop(session_processes(session_dir))


def start_watcher(driver_pid: int, session_dir: str) -> subprocess.Popen:
    """The watcher, in a session of its own so that a Ctrl-C or a kill of the driver's group does not end it."""
    return subprocess.Popen([sys.executable, "-m", "pipelines.reaper", str(driver_pid), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
