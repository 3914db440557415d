"""One Tune trial: the sampled overrides applied to the batch's single-run training, run by a Ray Train
TorchTrainer inside the trial. Every stage boundary of every concept reports a cheap evaluation (a few
prompts and seeds) so ASHA can stop weak trials between stages; the last report is the full evaluation."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import ray
from ray.train import CheckpointConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from personalize.config import split_overrides
from personalize.run_settings import EvaluationSpec, RunSpec

log = logging.getLogger(__name__)
TIMED_OUT = "TIMED_OUT"


def objective(metrics: dict, weights: dict[str, float]) -> float:
    """The scalar a scheduler ranks trials by: the weighted sum of evaluation scores."""
    return float(sum(w * metrics[k] for k, w in weights.items()))


def trial_specs(settings: dict, overrides: dict, trial_id: str) -> list[RunSpec]:
    """The batch's runs for the one tuned method, with this trial's overrides, written under trials/<id>."""
    from pipelines.config import BatchConfig, resolve_batch
    from pipelines.storage import StorageRoot

    batch = BatchConfig.model_validate_json(settings["batch"])
    method_over, experiment_over = split_overrides(overrides)
    method = batch.methods[0]
    batch = batch.model_copy(update={**experiment_over, "method_overrides": {
        method: {**batch.method_overrides.get(method, {}), **method_over}}})
    root = StorageRoot(batch.storage)
    runs = str(root.local("trials", trial_id, "runs"))
    return resolve_batch(BatchConfig.model_validate(batch.model_dump()), Path(settings["base_dir"]), runs,
                         str(root.local("cache")))


def train_loop(config: dict) -> None:
    """Inside the Train worker: every concept in turn, a report at each stage end, then the full evaluation."""
    from personalize.evaluation import Scorers, evaluate_in_training, evaluate_run
    from personalize.stages import run_method

    specs = [RunSpec.model_validate_json(s) for s in config["specs"]]
    stage_eval = EvaluationSpec.model_validate_json(config["stage_eval"])
    final_eval = EvaluationSpec.model_validate_json(config["final_eval"])
    weights = config["weights"]
    scorers = Scorers(stage_eval.clip, stage_eval.dino, "cuda" if _cuda() else "cpu")
    tracker = _tracker(config, specs[0])

    for position, spec in enumerate(specs):
        if tracker is not None and len(specs) > 1:
            tracker.prefix = f"{spec.concept.id}/"

        def report(ctx, index, stage, concept=position):
            m = evaluate_in_training(ctx, stage_eval, scorers, config["stage_eval_prompts"])
            ray.train.report({"phase": "stage", "concept_index": concept, "stage_index": index, "clip_t": m["clip_t"],
                              "clip_i": m["clip_i"], "dino": m["dino"], "objective": objective(m, weights)})

        run_method(spec, sink=tracker, progress=False, on_stage_end=report, resume=True)
    finals = [evaluate_run(spec.run_dir, final_eval, scorers if final_eval.clip == stage_eval.clip else None, progress=False).metrics
              for spec in specs]
    mean = {k: sum(m[k] for m in finals) / len(finals) for k in ("clip_t", "clip_i", "dino")}
    if tracker is not None:
        tracker.prefix = ""
        tracker.log_metrics({f"eval/{k}": v for k, v in mean.items()}, 0)
        tracker.finish(specs[0].run_dir, "FINISHED")
    ray.train.report({"phase": "final", "concept_index": len(specs), "stage_index": -1, **mean, "objective": objective(mean, weights)})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _tracker(config: dict, spec: RunSpec):
    if not config.get("tracking"):
        return None
    from pipelines.tracking import RunTracker

    trial_id = config["trial_id"]
    return RunTracker(config["tracking"], spec, key=f"trial/{trial_id}", name=f"trial {trial_id}",
                      extra_params={"overrides": config["overrides"]}, extra_tags={"trial_id": trial_id})


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

    settings, overrides = config["settings"], config["overrides"]
    trial_id = ray.tune.get_context().get_trial_id()
    specs = trial_specs(settings, overrides, trial_id)
    root = StorageRoot(settings["storage"])
    watchdog = threading.Timer(settings["trial_timeout_s"], _give_up, args=(root, trial_id, settings["trial_timeout_s"]))
    watchdog.daemon = True
    watchdog.start()
    storage_path, filesystem = root.ray_storage()

    def trainer_for(callback: UserCallback) -> TorchTrainer:
        return TorchTrainer(
            train_loop,
            train_loop_config={"specs": [s.model_dump_json() for s in specs], "stage_eval": settings["stage_eval"],
                               "final_eval": settings["final_eval"], "weights": settings["weights"], "trial_id": trial_id,
                               "stage_eval_prompts": settings["stage_eval_prompts"], "tracking": settings.get("tracking"),
                               "overrides": overrides},
            scaling_config=ScalingConfig(**settings["scaling"]),
            run_config=RunConfig(name=f"{settings['name']}-{trial_id}", storage_path=storage_path, storage_filesystem=filesystem,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=[callback],
                                 worker_runtime_env={"env_vars": settings.get("env", {})}),
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
