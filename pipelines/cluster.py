"""Joining a Ray cluster, or starting a local one bound to 127.0.0.1, and reading its capacity."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)

# Forwarded to every Ray worker: Ray only propagates RAY_TRAIN_* variables by itself.
FORWARDED_ENV = ("PERSONALIZE_PLUGINS", "PERSONALIZE_VERBOSE", "PERSONALIZE_INJECT_FAULT", "PERSONALIZE_INJECT_HANG", "PERSONALIZE_INJECT_CRASH", "PERSONALIZE_REHEARSAL_STEP_S", "PERSONALIZE_CACHE", "HF_HUB_OFFLINE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

# How often a Ray Train controller polls its workers (Ray's default: 2 s). Every start, finish and stage report of a
# run waits for a poll: at 0.5 s a run's fixed cost on a 2-core machine drops from 13 to 8 s, for 4 cheap calls a second.
TRAIN_POLL_SECONDS = "0.5"


# Ray workers keep the libraries' per-load progress bars and notices to themselves unless the run is verbose
QUIET_LIBRARIES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def verbose() -> bool:
    """`-v`: Ray's worker logs and the libraries' notices on the terminal too."""
    return os.environ.get("PERSONALIZE_VERBOSE") == "1"


def forwarded_env() -> dict[str, str]:
    env = {} if verbose() else dict(QUIET_LIBRARIES)
    env.update({k: os.environ[k] for k in (*FORWARDED_ENV, *QUIET_LIBRARIES) if k in os.environ})
    return env


def connect(num_cpus: int | None = None) -> str:
    """Attach to the cluster named by RAY_ADDRESS (or the one a `ray job submit` runs in); otherwise start a
    local Ray in this process, on loopback only. Returns a description."""
    if ray.is_initialized():
        return "already connected"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_SECONDS)
    env = {"env_vars": forwarded_env()}
    # Ray's own notices ("Started a local Ray instance", ...) only with -v: the line returned here says it
    level = logging.INFO if verbose() else logging.WARNING
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(runtime_env=env, log_to_driver=verbose(), logging_level=level)
        return f"joined the cluster at {os.environ.get('RAY_ADDRESS', 'the job cluster')}"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps every Ray listener on 127.0.0.1
    # no node of a local Ray is preempted: Ray Train's watcher for that would be a process per run for nothing
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not verbose():  # a local Ray turns on token authentication (kept) and says so each time (not shown)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    cpus = num_cpus or max(4, os.cpu_count() or 2)  # logical CPUs: drivers and actors mostly wait
    # As many worker start-ups at once as the CPUs Ray schedules (its default is the machine's cores): on a small
    # machine a batch's Train and Data processes otherwise exceed 4x that and the raylet prints a warning per batch.
    # Measured on 2 cores, a 6-run batch: no warning, 84.1-84.5 s against 85.3-85.7 s.
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(cpus))
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner needs: without it the
    # CPUs of a trainer whose controller was killed (a trial stopped by ASHA) are never given back.
    port = free_port()
    ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, runtime_env=env,
             log_to_driver=verbose(), logging_level=level, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 1024 * 1024)
    from pipelines.reaper import start_watcher

    session = ray._private.worker._global_node.get_session_dir_path()
    start_watcher(os.getpid(), session)  # ours to stop, even if killed
    logs = "" if verbose() else f"; Ray's worker logs in {session}/logs (-v shows them here)"
    return f"started a local Ray on 127.0.0.1 with {cpus} logical CPUs (dashboard http://127.0.0.1:{port}){logs}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: float

    @property
    def use_gpu(self) -> bool:
        return self.gpus >= 1


def capacity() -> Capacity:
    total = ray.cluster_resources()
    return Capacity(total.get("CPU", 0.0), total.get("GPU", 0.0))


def concurrent_runs(cap: Capacity, gpus_per_run: int, cpus_per_run: float, limit: int | None) -> int:
    """How many runs fit at once: by GPUs when there are GPUs, else by CPUs (one CPU kept for drivers/actors)."""
    if cap.use_gpu:
        fit = int(cap.gpus // max(1, gpus_per_run))
    else:
        fit = int(max(1.0, cap.cpus - 1) // cpus_per_run)
    fit = max(1, fit)
    return min(fit, limit) if limit else fit


def setup_logging() -> None:
    """Our packages log at INFO, everything else (Ray, MLflow, urllib3) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("personalize", "pipelines", "tuning"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("mlflow").setLevel(logging.DEBUG if verbose() else logging.WARNING)  # "Created version 3 of ..."
