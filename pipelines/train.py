"""A batch on Ray Train: one Ray Train run per pack of (concept, method) runs, around the shared worker entry
(pipelines/worker.py).

A pack's runs train one after the other in the same Train worker, so Ray's start of a controller and a worker
is paid once a pack rather than once a run (`resources.runs_per_trainer`; by default packs of up to MAX_PACK
runs that fill every concurrent slot). Every stage end is reported as a Ray checkpoint under a stable name, so a
restarted worker (FailureConfig) or a resubmitted batch resumes from the last stage checkpoint. Bad input fails
its run with its reason and is not retried; a finished run (DONE.json with the same config hash) is never started
again. A pack whose Train run fails for good settles the runs it finished; its other runs go back to the queue
one by one, so a crash fails only the run it happened in.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import shutil
import threading
import time

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from personalize.outcome import RunOutcome
from personalize.run_folder import FAILED, failure_hash, failure_reason, read_done, stage_seconds
from personalize.run_settings import RunSpec
from pipelines.progress import Progress
from pipelines.redaction import redact
from pipelines.trainer import make_trainer
from pipelines.worker import WorkerTask, train_loop_per_worker

log = logging.getLogger(__name__)
MAX_PACK = 8


def run_name(spec: RunSpec) -> str:
    return f"{spec.concept.id}--{spec.method.name}--{spec.config_hash()}"


def pack_size(runs: int, concurrency: int, limit: int | None = None) -> int:
    """How many runs one Train run trains in turn: `limit` when set, else as many as fill each concurrent slot
    once (at most MAX_PACK), then evened out so that the last wave is as full as the others."""
    if limit:
        return limit
    if runs == 0:
        return 1
    waves = math.ceil(runs / (concurrency * MAX_PACK))
    return max(1, math.ceil(runs / (concurrency * waves)))


def pack_runs(specs: list[RunSpec], size: int) -> list[list[RunSpec]]:
    return [specs[i : i + size] for i in range(0, len(specs), size)]


def pack_name(pack: list[RunSpec]) -> str:
    """Ray Train's run name: the run's own for a pack of one, else one derived from its runs. Packs are cut from
    the whole batch, finished runs included, so a resubmitted batch finds the same names and Ray's checkpoints."""
    if len(pack) == 1:
        return run_name(pack[0])
    digest = hashlib.sha256("\n".join(run_name(s) for s in pack).encode()).hexdigest()[:12]
    return f"{pack[0].concept.id}--{pack[0].method.name}--and-{len(pack) - 1}-more--{digest}"


def fit_pack(pack: list[RunSpec], name: str, scaling: dict, storage: str, max_failures: int, env: dict,
             tracking: dict | None) -> str | None:
    """One Train run that trains the pack's runs in turn, called from a thread of the driver: its controller is
    attached to the driver's node, and no process is started only to wait for it. None when it ended, else the
    error."""
    from pipelines.storage import StorageRoot

    storage_path, filesystem = StorageRoot(storage).ray_storage()
    task = WorkerTask(specs=pack, storage=storage, tracking=tracking)
    trainer = make_trainer(
        train_loop_per_worker, {"task": task.model_dump_json()}, ScalingConfig(**scaling),
        RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
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
    if done is not None and spec.owns(done["config_hash"]):
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
    from personalize.errors import RunStateError
    from personalize.run_folder import DONE, check_photos, other_configuration, owner

    if root.remote and not root.pull(root.relative(spec.run_dir), marker=DONE):
        holder = owner(spec.run_dir)
        if spec.owns(holder) and read_done(spec.run_dir) is not None:
            root.push(root.relative(spec.run_dir), marker=DONE)
        elif holder is not None and not spec.owns(holder):
            log.info("discarding %s: a cached run of another configuration that %s does not hold", spec.run_dir, root.uri())
            shutil.rmtree(spec.run_dir)
    holder = owner(spec.run_dir)
    if holder is not None and not spec.owns(holder):
        return RunOutcome(spec, "failed", str(other_configuration(root.uri(root.relative(spec.run_dir)), holder,
                                                                  spec.config_hash())))
    done = read_done(spec.run_dir)
    if done is not None:
        try:
            check_photos(spec.run_dir, done, spec)
        except RunStateError as e:
            return RunOutcome(spec, "failed", str(e))
        return RunOutcome(spec, "skipped", "already finished", 0.0, stage_seconds(done))
    root.remove_file(f"{root.relative(spec.run_dir)}/{FAILED}")  # a resubmission retries runs that failed before
    return None


def train_runs(specs: list[RunSpec], scaling: dict, storage: str, concurrency: int, max_failures: int,
               env: dict, tracking: dict | None = None, runs_per_trainer: int | None = None) -> list[RunOutcome]:
    """Train every run, at most `concurrency` packs at a time; runs settled by an earlier submission start nothing."""
    from pipelines.storage import StorageRoot

    root = StorageRoot(storage)
    outcomes, pending = [], []
    for pack in pack_runs(specs, pack_size(len(specs), concurrency, runs_per_trainer)):
        name, to_train = pack_name(pack), []
        for spec in pack:
            earlier = earlier_outcome(spec, root)
            if earlier is None:
                to_train.append(spec)
            else:
                outcomes.append(earlier)
        if to_train:
            pending.append((name, to_train))
    inflight: dict[str, tuple[list[RunSpec], float]] = {}
    progress = Progress([s for _, pack in pending for s in pack])
    # Each pack is fitted from a thread of this process, so its Train controller (which Ray attaches to the node
    # that calls fit) stays on the driver's node: a worker node lost mid-batch takes only Ray Train workers with it,
    # which restart elsewhere. The threads are daemons: a driver that stops (an error, Ctrl-C) does not wait for them.
    finished: queue.Queue = queue.Queue()

    def fit(name: str, pack: list[RunSpec]) -> None:
        try:
            error = fit_pack(pack, name, scaling, storage, max_failures, env, tracking)
        except Exception as e:  # setting the run up failed: still a result, or the batch would wait for it forever
            error = f"{type(e).__name__}: {e}"
        finished.put((name, error))

    while pending or inflight:
        while pending and len(inflight) < concurrency:
            name, pack = pending.pop(0)
            log.info("training %s", ", ".join(f"{s.concept.id} / {s.method.name}" for s in pack))
            inflight[name] = (pack, time.perf_counter())
            threading.Thread(target=fit, args=(name, pack), name=f"fit-{name[:40]}", daemon=True).start()
        try:
            name, error = finished.get(timeout=5.0)
        except queue.Empty:
            if progress.due():
                training = [s for pack, _ in inflight.values() for s in pack]
                print(progress.line(training, sum(len(pack) for _, pack in pending)), flush=True)
            continue
        pack, began = inflight.pop(name)
        retry = []
        for spec in pack:
            fetch_run(spec, root)
            if error and len(pack) > 1 and not is_settled(spec):
                retry.append(spec)  # the run the crash happened in, or one the pack did not reach
            else:
                outcomes.append(settle(spec, error, time.perf_counter() - began, len(pack) > 1, progress))
        if retry:
            log.info("%s ended with %s: its %d unfinished run(s) go back to the queue one by one", name,
                     redact(error), len(retry))
        pending[:0] = [(run_name(spec), [spec]) for spec in retry]
    return outcomes


def fetch_run(spec: RunSpec, root) -> None:
    """With an s3 root, the run's folder (or its failure) from the bucket: it may have trained on another node."""
    from personalize.run_folder import DONE

    if root.remote and not root.pull(root.relative(spec.run_dir), marker=DONE):
        root.pull_file(f"{root.relative(spec.run_dir)}/{FAILED}")


def is_settled(spec: RunSpec) -> bool:
    done = read_done(spec.run_dir)
    return (done is not None and spec.owns(done["config_hash"])) or spec.owns(failure_hash(spec.run_dir))


def settle(spec: RunSpec, error: str | None, seconds: float, packed: bool, progress: Progress) -> RunOutcome:
    """A run's outcome once its Train run returned, read from its folder. A run trained in a pack of several takes
    the seconds its worker spent on it; a run trained alone, the wall time of its Train run."""
    from pipelines.worker import read_node_record

    if packed:
        seconds = read_node_record(spec.run_dir).get("seconds", 0.0)
    outcome = outcome_of(spec, error, seconds)
    log.info("%s / %s: %s %s", spec.concept.id, spec.method.name, outcome.status, redact(outcome.reason))
    progress.record(spec, outcome.status)
    return outcome
