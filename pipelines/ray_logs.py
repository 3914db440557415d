"""A job's Ray worker logs, copied from every node of the cluster into the storage root: Ray keeps them in each
node's temporary session folder, which a restart or another machine's user never sees, and off the terminal
unless `-v`. They land next to the results (and in MLflow, with the batch's parent run)."""

from __future__ import annotations

import logging
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import ray

from pipelines.redaction import redact

log = logging.getLogger(__name__)
MAX_LINES = 20_000  # per file: the end of a long run's log is where its failure is


def is_ours(text: str, job_id: str) -> bool:
    """Ray marks each task's or actor's output in a worker log with its job; a worker of another job on a shared
    cluster (or one never used) has no such line."""
    return f":job_id:{job_id}" in text


class StateApiLogs:
    """A node's worker logs through Ray's state API (served by the node's dashboard agent)."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        # the connected cluster's address: left out, Ray looks for one running on this machine and refuses to
        # choose when it finds two (a local batch beside `personalize stack up`)
        self.address = ray.get_runtime_context().gcs_address

    def names(self) -> set[str]:
        from ray.util.state import list_logs

        return {name for group in list_logs(address=self.address, node_id=self.node_id, glob_filter="*worker-*").values()
                for name in group if Path(name).name.startswith("worker-")}

    def read(self, name: str, max_lines: int) -> str:
        from ray.util.state import get_log

        return "".join(get_log(address=self.address, node_id=self.node_id, filename=name, tail=max_lines, errors="replace"))


class FolderLogs:
    """The driver's own node: its session's logs folder, read from disk. (Two local Rays on one machine share the
    agent's fixed port, so the second one's state API cannot serve logs; its files are still here.)"""

    def __init__(self, folder: Path):
        self.folder = folder

    def names(self) -> set[str]:
        return {p.name for p in self.folder.glob("worker-*") if p.is_file()}

    def read(self, name: str, max_lines: int) -> str:
        with (self.folder / name).open(errors="replace") as f:
            return "".join(deque(f, maxlen=max_lines))


def node_readers() -> list[tuple[str, str, StateApiLogs | FolderLogs]]:
    """(node id, ip, reader) for every live node: files on disk for the driver's node, the state API elsewhere."""
    here = ray.get_runtime_context().get_node_id()
    node = ray._private.worker._global_node
    folder = Path(node.get_logs_dir_path()) if node is not None else None
    readers = []
    for node_info in ray.nodes():
        if not node_info.get("Alive"):
            continue
        node_id, ip = node_info["NodeID"], node_info["NodeManagerAddress"]
        local = node_id == here and folder is not None and folder.is_dir()
        readers.append((node_id, ip, FolderLogs(folder) if local else StateApiLogs(node_id)))
    return readers


class WorkerLogs:
    """The worker logs of what runs between start() and save(): the files of worker processes started meanwhile
    (every actor, Ray Train's and Ray Data's included, and the job's task workers) whose output is this job's."""

    def __init__(self):
        self.known: dict[str, set[str]] | None = None

    def start(self) -> None:
        self.known = {}
        for node_id, ip, reader in node_readers():
            try:
                self.known[node_id] = reader.names()
            except Exception as e:  # a node whose logs cannot be listed now: all of its files count as new
                log.warning("could not list Ray's worker logs on node %s: %s", ip, e)

    def collect(self, dest: Path, max_lines: int = MAX_LINES) -> list[Path]:  # after start()
        """Copy the new worker logs (stdout and stderr) of this job to dest/<node ip>/, credentials removed; returns
        the files written. A node that cannot be read is named in a warning and skipped."""
        job_id = ray.get_runtime_context().get_job_id()
        written = []
        for node_id, ip, reader in node_readers():
            try:
                for name in sorted(reader.names() - self.known.get(node_id, set())):
                    text = reader.read(name, max_lines)
                    if not is_ours(text, job_id):
                        continue
                    path = dest / ip / Path(name).name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(redact(text))
                    written.append(path)
            except Exception as e:  # the logs are a courtesy: the batch's results stand without them
                log.warning("could not copy Ray's worker logs from node %s: %s", ip, e)
        return written

    def save(self, root) -> Path | None:
        """Under the storage root (pushed to the bucket with an s3 root); None when not started or nothing was new."""
        if self.known is None or not ray.is_initialized():
            return None
        rel = logs_folder(root)
        if not self.collect(root.local(rel)):
            return None
        root.push(rel)
        return root.local(rel)


def logs_folder(root) -> str:
    """A new folder per submission under the storage root's `logs/`, named by its UTC time and Ray job (a
    resubmission never overwrites an earlier one)."""
    base = f"logs/{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-job{ray.get_runtime_context().get_job_id()}"
    rel, n = base, 1
    while root.local(rel).exists():
        n += 1
        rel = f"{base}-{n}"
    return rel
