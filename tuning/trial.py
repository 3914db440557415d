"""One Tune trial: the sampled overrides applied to the batch's runs of the tuned method, trained by a Ray Train
run inside the trial around the shared worker entry (pipelines/worker.py), which reports a cheap
evaluation at every stage boundary of every concept (so ASHA can stop weak trials between stages) and the full
evaluation last."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, RunConfig, ScalingConfig, UserCallback

from personalize.run_settings import RunSpec
from pipelines.trainer import make_trainer
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


class Watchdog:
    """Ends a trial that runs past its limit, or that has reported and then goes silent for too long (hung)."""

    def __init__(self, on_expiry, limit_s: float, report_limit_s: float | None = None, check_s: float = 1.0):
        self.on_expiry, self.limit_s, self.report_limit_s, self.check_s = on_expiry, limit_s, report_limit_s, check_s
        self.started = self.last_report = None
        self.stopped = threading.Event()

    def start(self) -> Watchdog:
        self.started = time.monotonic()
        threading.Thread(target=self._watch, name="trial-watchdog", daemon=True).start()
        return self

    def reported(self) -> None:
        self.last_report = time.monotonic()

    def cancel(self) -> None:
        self.stopped.set()

    def expired(self, now: float) -> str | None:
        if now - self.started > self.limit_s:
            return f"the trial ran longer than {self.limit_s:.0f} s and was stopped"
        if self.report_limit_s is not None and self.last_report is not None and now - self.last_report > self.report_limit_s:
            return f"the trial reported nothing for {self.report_limit_s:.0f} s (hung) and was stopped"
        return None

    def _watch(self) -> None:
        while not self.stopped.wait(self.check_s):
            reason = self.expired(time.monotonic())
            if reason is not None:
                self.on_expiry(reason)
                return


def fit_and_forward(trainer_for, watchdog: Watchdog | None = None, poll_s: float = 0.5) -> None:
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
            if watchdog is not None:
                watchdog.reported()
            continue
        except Empty:
            pass
        if not worker.is_alive() and results.empty():
            break
    worker.join()
    if failure:
        raise failure[0]


def trial(config: dict) -> None:
    """The Tune trainable: a Ray Train run for this trial's overrides, guarded by its watchdog."""
    from pipelines.storage import StorageRoot
    from pipelines.worker import TrialEvaluation, WorkerTask, train_loop_per_worker

    settings, overrides = TrialSettings.model_validate_json(config["settings"]), config["overrides"]
    trial_id = ray.tune.get_context().get_trial_id()
    specs = trial_specs(settings, overrides, trial_id)
    root = StorageRoot(settings.batch.storage)
    watchdog = Watchdog(lambda reason: _give_up(root, trial_id, reason), settings.trial_timeout_s,
                        settings.report_timeout_s).start()
    storage_path, filesystem = root.ray_storage()
    task = WorkerTask(specs=specs, storage=settings.batch.storage, tracking=settings.tracking, trial=TrialEvaluation(
        trial_id=trial_id, stage_eval=settings.stage_eval, final_eval=settings.final_eval,
        stage_eval_prompts=settings.stage_eval_prompts, weights=settings.weights, overrides=overrides))

    def trainer_for(callback: UserCallback):
        return make_trainer(
            train_loop_per_worker, {"task": task.model_dump_json()}, ScalingConfig(**settings.scaling),
            RunConfig(name=f"{settings.name}-{trial_id}", storage_path=storage_path, storage_filesystem=filesystem,
                      checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=[callback],
                      worker_runtime_env={"env_vars": settings.env}),
        )

    try:
        fit_and_forward(trainer_for, watchdog)
    finally:
        watchdog.cancel()


def _give_up(root, trial_id: str, reason: str) -> None:
    """The trial has run past a limit: leave a note and end its process (its Train actors share its fate)."""
    try:
        leave_timeout_note(root, trial_id, reason)
    except Exception:  # the note is a courtesy: the trial ends either way
        log.exception("could not store the time-out note of trial %s", trial_id)
    log.error("trial %s: %s", trial_id, reason)
    os._exit(3)


def leave_timeout_note(root, trial_id: str, reason: str) -> None:
    """The note the sweep's driver reads to tell a timed-out trial from a failed one, stored in the storage root
    (with an s3 root the driver may run on another machine)."""
    rel = f"trials/{trial_id}/{TIMED_OUT}"
    root.local(rel).parent.mkdir(parents=True, exist_ok=True)
    root.local(rel).write_text(reason + "\n")
    root.push_file(rel)
