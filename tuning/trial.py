"""One Tune trial: the sampled overrides applied to the batch's runs of the tuned method, trained by a Ray Train
TorchTrainer inside the trial around the shared worker entry (pipelines/worker.py), which reports a cheap
evaluation at every stage boundary of every concept (so ASHA can stop weak trials between stages) and the full
evaluation last."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import ray
from ray.train import CheckpointConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from personalize.run_settings import RunSpec
from tuning.config import TrialSettings

log = logging.getLogger(__name__)
TIMED_OUT = "TIMED_OUT"


def trial_specs(settings: TrialSettings, overrides: dict, trial_id: str) -> list[RunSpec]:
    """The batch's runs for the one tuned method, with this trial's overrides, written under trials/<id>."""
    from pipelines.config import resolve_batch
    from pipelines.storage import StorageRoot

    batch = settings.trial_batch(overrides)
    root = StorageRoot(batch.storage)
    return resolve_batch(batch, Path(settings.base_dir), str(root.local("trials", trial_id, "runs")), str(root.local("cache")))


class ForwardReports(UserCallback):
    """Runs in the TrainController: puts worker 0's report of each Train step on a queue the trial reads.

    Ray's own TuneReportCallback hands results to the trial's session through a size-1 queue that its main
    thread also fills, and a trial that returned while a result was in flight could block forever (ray
    2.60). Here the trial's own thread takes each result off an unbounded queue and reports it to Tune."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(dict(metrics[0]))


def fit_and_forward(trainer_for, poll_s: float = 0.5) -> None:
    """Fit the trainer on a helper thread; report its results to Tune from this (the trial's) thread, in order,
    including any that arrive as the fit ends. A failed fit is raised here after its results are reported."""
    from ray.util.queue import Empty, Queue

    results = Queue(actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer_for(ForwardReports(results)).fit()
        except BaseException as e:  # re-raised on the trial's thread
            failure.append(e)

    worker = threading.Thread(target=fit, name="trial-fit", daemon=True)
    worker.start()
    while True:
        try:
            ray.tune.report(results.get(timeout=poll_s))
            continue
        except Empty:
            pass
        if not worker.is_alive() and results.empty():
            break
    worker.join()
    if failure:
        raise failure[0]


def trial(config: dict) -> None:
    """The Tune trainable: a TorchTrainer for this trial's overrides, guarded by a wall-clock limit."""
    from pipelines.storage import StorageRoot
    from pipelines.worker import TrialEvaluation, WorkerTask, train_loop_per_worker

    settings, overrides = TrialSettings.model_validate_json(config["settings"]), config["overrides"]
    trial_id = ray.tune.get_context().get_trial_id()
    specs = trial_specs(settings, overrides, trial_id)
    root = StorageRoot(settings.batch.storage)
    watchdog = threading.Timer(settings.trial_timeout_s, _give_up, args=(root, trial_id, settings.trial_timeout_s))
    watchdog.daemon = True
    watchdog.start()
    storage_path, filesystem = root.ray_storage()
    task = WorkerTask(specs=specs, storage=settings.batch.storage, tracking=settings.tracking, trial=TrialEvaluation(
        trial_id=trial_id, stage_eval=settings.stage_eval, final_eval=settings.final_eval,
        stage_eval_prompts=settings.stage_eval_prompts, weights=settings.weights, overrides=overrides))

    def trainer_for(callback: UserCallback) -> TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"task": task.model_dump_json()},
            scaling_config=ScalingConfig(**settings.scaling),
            run_config=RunConfig(name=f"{settings.name}-{trial_id}", storage_path=storage_path, storage_filesystem=filesystem,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=[callback],
                                 worker_runtime_env={"env_vars": settings.env}),
        )

    try:
        fit_and_forward(trainer_for)
    finally:
        watchdog.cancel()


def _give_up(root, trial_id: str, limit: float) -> None:
    """The trial has run past its limit: leave a note and end its process (its Train actors share its fate)."""
    try:
        leave_timeout_note(root, trial_id, limit)
    except Exception:  # the note is a courtesy: the trial ends either way
        log.exception("could not store the time-out note of trial %s", trial_id)
    log.error("trial exceeded %.0f s; stopping it", limit)
    os._exit(3)


def leave_timeout_note(root, trial_id: str, limit: float) -> None:
    """The note the sweep's driver reads to tell a timed-out trial from a failed one, stored in the storage root
    (with an s3 root the driver may run on another machine)."""
    rel = f"trials/{trial_id}/{TIMED_OUT}"
    root.local(rel).parent.mkdir(parents=True, exist_ok=True)
    root.local(rel).write_text(f"the trial ran longer than {limit:.0f} s and was stopped\n")
    root.push_file(rel)
