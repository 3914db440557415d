"""A job's Ray worker logs, copied from every node of the cluster into the storage root: Ray keeps them in each
node's temporary session folder, which a restart or another machine's user never sees, and off the terminal
unless `-v`. They land next to the results (and in MLflow, with the batch's parent run)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import ray

from pipelines.redaction import redact

log = logging.getLogger(__name__)
MAX_LINES = 20_000  # per file: the end of a long run's log is where its failure is


def is_ours(text: str, job_id: str) -> bool:
    """Ray marks each task's or actor's output in a worker log with its job; a worker of another job on a shared
    cluster (or one never used) has no such line."""
    return f":job_id:{job_id}" in text


def worker_log_names(node_id: str) -> set[str]:
    from ray.util.state import list_logs

    return {name for group in list_logs(node_id=node_id, glob_filter="*worker-*").values() for name in group
            if Path(name).name.startswith("worker-")}


def live_nodes() -> list[tuple[str, str]]:
    return [(node["NodeID"], node["NodeManagerAddress"]) for node in ray.nodes() if node.get("Alive")]


class WorkerLogs:
    """The worker logs of what runs between start() and save(): the files of worker processes started meanwhile
    (every actor, Ray Train's and Ray Data's included, and the job's task workers) whose output is this job's."""

    def __init__(self):
        self.known: dict[str, set[str]] | None = None

    def start(self) -> None:
        self.known = {}
        for node_id, ip in live_nodes():
            try:
                self.known[node_id] = worker_log_names(node_id)
            except Exception as e:  # a node whose logs cannot be listed now: all of its files count as new
                log.warning("could not list Ray's worker logs on node %s: %s", ip, e)

    def collect(self, dest: Path, max_lines: int = MAX_LINES) -> list[Path]:  # after start()
        """Copy the new worker logs (stdout and stderr) of this job to dest/<node ip>/, credentials removed; returns
        the files written. A node that cannot be read is named in a warning and skipped."""
        from ray.util.state import get_log

        job_id = ray.get_runtime_context().get_job_id()
        written = []
        for node_id, ip in live_nodes():
            try:
                for name in sorted(worker_log_names(node_id) - self.known.get(node_id, set())):
                    text = "".join(get_log(node_id=node_id, filename=name, tail=max_lines, errors="replace"))
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
    base = f"logs/{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-job{ray.get_runtime_context().get_job_id()}"
    rel, n = base, 1
    while root.local(rel).exists():
        n += 1
        rel = f"{base}-{n}"
    return rel
