"""A batch on Ray Train: one TorchTrainer per (concept, method) run, around the shared worker entry (pipelines/worker.py).

Every stage end is reported as a Ray checkpoint under a stable run name, so a restarted worker (FailureConfig)
or a resubmitted batch resumes from the last stage checkpoint. Bad input fails the run with its reason and is
not retried; a finished run (DONE.json with the same config hash) is never started again.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from personalize.outcome import RunOutcome
from personalize.run_folder import FAILED, failure_reason, read_done, stage_seconds
from personalize.run_settings import RunSpec
from pipelines.progress import Progress
from pipelines.redaction import redact
from pipelines.worker import WorkerTask, train_loop_per_worker

log = logging.getLogger(__name__)


def run_name(spec: RunSpec) -> str:
    return f"{spec.concept.id}--{spec.method.name}--{spec.config_hash()}"


def fit_run(spec: RunSpec, scaling: dict, storage: str, max_failures: int, env: dict, tracking: dict | None) -> str | None:
    """One run's Ray Train run, called from a thread of the driver: its controller is attached to the driver's
    node, and no process is started only to wait for it. None when it finished, else the error."""
    from pipelines.storage import StorageRoot

    storage_path, filesystem = StorageRoot(storage).ray_storage()
    task = WorkerTask(specs=[spec], storage=storage, tracking=tracking)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task.model_dump_json()},
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(
            name=run_name(spec), storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        trainer.fit()
        return None
    except Exception as e:  # the run failed for good (all restarts used): report, do not take the batch down
        return f"{type(e).__name__}: {e}"


def outcome_of(spec: RunSpec, error: str | None, seconds: float) -> RunOutcome:
    done = read_done(spec.run_dir)
    if done is not None and done["config_hash"] == spec.config_hash():
        return RunOutcome(spec, "finished", seconds=seconds, stage_seconds=stage_seconds(done))
    reason = failure_reason(spec.run_dir)
    if reason is not None:
        return RunOutcome(spec, "failed", reason, seconds)
    return RunOutcome(spec, "failed", error or "training ended without finishing", seconds)


def earlier_outcome(spec: RunSpec, root) -> RunOutcome | None:
    """What an earlier submission settled for this run: skipped when it finished with this configuration, failed
    (nothing started, nothing overwritten) when its folder holds another configuration's run; None to train it.

    With an s3 root the bucket is the record and the local folder a cache of it: a finished run is pulled from the
    bucket; a local copy the bucket does not hold is pushed when it is this configuration's finished run (its upload
    was cut short) and discarded when it belongs to another configuration (left over from another bucket's life)."""
    from personalize.run_folder import DONE, other_configuration, owner

    expected = spec.config_hash()
    if root.remote and not root.pull(root.relative(spec.run_dir), marker=DONE):
        holder = owner(spec.run_dir)
        if holder == expected and read_done(spec.run_dir) is not None:
            root.push(root.relative(spec.run_dir), marker=DONE)
        elif holder is not None and holder != expected:
            log.info("discarding %s: a cached run of another configuration that %s does not hold", spec.run_dir, root.uri())
            shutil.rmtree(spec.run_dir)
    holder = owner(spec.run_dir)
    if holder is not None and holder != expected:
        return RunOutcome(spec, "failed", str(other_configuration(root.uri(root.relative(spec.run_dir)), holder, expected)))
    done = read_done(spec.run_dir)
    if done is not None:
        return RunOutcome(spec, "skipped", "already finished", 0.0, stage_seconds(done))
    root.remove_file(f"{root.relative(spec.run_dir)}/{FAILED}")  # a resubmission retries runs that failed before
    return None


def train_runs(specs: list[RunSpec], scaling: dict, storage: str, concurrency: int, max_failures: int,
               env: dict, tracking: dict | None = None) -> list[RunOutcome]:
    """Train every run, at most `concurrency` at a time; runs settled by an earlier submission start nothing."""
    from pipelines.storage import StorageRoot

    root = StorageRoot(storage)
    outcomes, pending = [], []
    for spec in specs:
        earlier = earlier_outcome(spec, root)
        if earlier is None:
            pending.append(spec)
        else:
            outcomes.append(earlier)
    inflight: dict[int, tuple[RunSpec, float]] = {}
    progress = Progress(pending)
    # Each run is fitted from a thread of this process, so its Train controller (which Ray attaches to the node
    # that calls fit) stays on the driver's node: a worker node lost mid-batch takes only Ray Train workers with it,
    # which restart elsewhere. The threads are daemons: a driver that stops (an error, Ctrl-C) does not wait for them.
    finished: queue.Queue = queue.Queue()

    def fit(spec: RunSpec) -> None:
        try:
            error = fit_run(spec, scaling, storage, max_failures, env, tracking)
        except Exception as e:  # setting the run up failed: still a result, or the batch would wait for it forever
            error = f"{type(e).__name__}: {e}"
        finished.put((id(spec), error))

    while pending or inflight:
        while pending and len(inflight) < concurrency:
            spec = pending.pop(0)
            log.info("training %s / %s", spec.concept.id, spec.method.name)
            inflight[id(spec)] = (spec, time.perf_counter())
            threading.Thread(target=fit, args=(spec,), name=f"fit-{spec.concept.id}", daemon=True).start()
        try:
            key, error = finished.get(timeout=5.0)
        except queue.Empty:
            if progress.due():
                print(progress.line([s for s, _ in inflight.values()], len(pending)), flush=True)
            continue
        spec, began = inflight.pop(key)
        outcomes.append(settle(spec, root, error, began, progress))
    return outcomes


def settle(spec: RunSpec, root, error: str | None, began: float, progress: Progress) -> RunOutcome:
    """A run's outcome once its Train run returned, read from its folder (pulled from the bucket with an s3 root)."""
    from personalize.run_folder import DONE

    if root.remote:  # the run may have trained on another node: its folder, or its failure, is in the bucket
        if not root.pull(root.relative(spec.run_dir), marker=DONE):
            root.pull_file(f"{root.relative(spec.run_dir)}/{FAILED}")
    outcome = outcome_of(spec, error, time.perf_counter() - began)
    log.info("%s / %s: %s %s", spec.concept.id, spec.method.name, outcome.status, redact(outcome.reason))
    progress.record(spec, outcome.status)
    return outcome
