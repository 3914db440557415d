"""A batch on Ray Train: one TorchTrainer per (concept, method) run, around the shared worker entry (pipelines/worker.py).

Every stage end is reported as a Ray checkpoint under a stable run name, so a restarted worker (FailureConfig)
or a resubmitted batch resumes from the last stage checkpoint. Bad input fails the run with its reason and is
not retried; a finished run (DONE.json with the same config hash) is never started again.
"""

from __future__ import annotations

import logging
import shutil
import time

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from personalize.outcome import RunOutcome
from personalize.run_folder import FAILED, failure_reason, read_done, stage_seconds
from personalize.run_settings import RunSpec
from pipelines.progress import Progress
from pipelines.redaction import redact
from pipelines.worker import WorkerTask, train_loop_per_worker

log = logging.getLogger(__name__)


def run_name(spec: RunSpec) -> str:
    return f"{spec.concept.id}--{spec.method.name}--{spec.config_hash()}"


@ray.remote(num_cpus=0, max_retries=0)
def _fit(spec_json: str, scaling: dict, storage: str, max_failures: int, env: dict, tracking: dict | None) -> str | None:
    from pipelines.storage import StorageRoot

    spec = RunSpec.model_validate_json(spec_json)
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
    from personalize.run_folder import DONE
    from pipelines.storage import StorageRoot

    root = StorageRoot(storage)
    outcomes, pending = [], []
    for spec in specs:
        earlier = earlier_outcome(spec, root)
        if earlier is None:
            pending.append(spec)
        else:
            outcomes.append(earlier)
    inflight: dict = {}
    progress = Progress(pending)
    # Each run's waiting task, and the Train controller that Ray attaches to its node, stay on the driver's node:
    # a worker node lost mid-batch then takes only Ray Train workers with it, which restart elsewhere.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            spec = pending.pop(0)
            log.info("training %s / %s", spec.concept.id, spec.method.name)
            # the driver's settings (the S3 endpoint above all) reach the trainer's controller too, not only its workers
            fit = _fit.options(scheduling_strategy=here, **({"runtime_env": {"env_vars": env}} if env else {}))
            ref = fit.remote(spec.model_dump_json(), scaling, storage, max_failures, env, tracking)
            inflight[ref] = (spec, time.perf_counter())
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=5.0)
        if not ready:
            if progress.due():
                print(progress.line([s for s, _ in inflight.values()], len(pending)), flush=True)
            continue
        spec, began = inflight.pop(ready[0])
        if root.remote:  # the run may have trained on another node: its folder, or its failure, is in the bucket
            if not root.pull(root.relative(spec.run_dir), marker=DONE):
                root.pull_file(f"{root.relative(spec.run_dir)}/{FAILED}")
        outcome = outcome_of(spec, ray.get(ready[0]), time.perf_counter() - began)
        log.info("%s / %s: %s %s", spec.concept.id, spec.method.name, outcome.status, redact(outcome.reason))
        progress.record(spec, outcome.status)
        outcomes.append(outcome)
    return outcomes
