"""The one Ray Train worker entry, for a batch's run and for a sweep's trial.

Each run of the task trains in turn (resuming from its checkpoint, restored from Ray's copy after a worker
restart; a run the task settled before the restart is not trained again). Every stage end is reported to Ray Train with its checkpoint; in a sweep's trial the report also carries
a cheap evaluation so that ASHA can stop weak trials between stages, and a last report carries the full
evaluation. Bad input (a concept, a config, a folder of another configuration) settles the run as failed with its
reason and is never retried; a trial that loses a run fails, since it can no longer be ranked with the others.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import ray
from pydantic import Field, model_validator
from ray.train import Checkpoint

from personalize.errors import ConceptError, ConfigError, RunStateError
from personalize.method_spec import Strict
from personalize.plugins import load_plugins
from personalize.run_folder import DONE, FAILED, failure_hash, read_done, write_failed
from personalize.run_settings import VALIDATION_SCORES, EvaluationSpec, RunSpec
from personalize.validation import objective  # the weighted sum a scheduler ranks trials by, as validation does

log = logging.getLogger(__name__)
NODE_RECORD = "node.json"  # where a run trained: written by Ray Train workers only
STAGE_IMAGES = "stage_images"  # in a stage checkpoint: the run folder's stage pictures up to that stage
BAD_INPUT = (ConceptError, ConfigError, RunStateError)


class TrialEvaluation(Strict):
    """What a sweep's trial measures: a cheap evaluation at every stage end, the full one after the last run."""

    trial_id: str
    stage_eval: EvaluationSpec
    final_eval: EvaluationSpec
    stage_eval_prompts: int = Field(ge=1)
    weights: dict[str, float]
    overrides: dict[str, Any] = {}  # the trial's sampled values, logged with its MLflow run


class WorkerTask(Strict):
    specs: list[RunSpec] = Field(min_length=1)
    storage: str
    tracking: dict | None = None  # RunTracker settings; None: no MLflow
    trial: TrialEvaluation | None = None  # set for a sweep's trial
    # the driver's local folder of the storage root: its specs' folders lie under it, on the driver's machine
    driver_root: str = ""

    @model_validator(mode="after")
    def _driver_root(self) -> WorkerTask:
        if not self.driver_root:
            from pipelines.storage import StorageRoot

            self.driver_root = str(StorageRoot(self.storage).local_root)
        return self


def on_this_node(spec: RunSpec, root, driver_root: str) -> RunSpec:
    """The run with its folders in this node's mirror of an s3 root instead of the driver's: on another machine
    (or under another home folder) the driver's folders are not the ones this node uploads from."""
    if not root.remote or Path(driver_root) == root.local_root:
        return spec
    moved = {}
    for field in ("output_dir", "prior_cache_dir", "latent_cache_dir"):
        folder = getattr(spec, field)
        if folder is not None and Path(folder).is_relative_to(driver_root):
            moved[field] = str(root.local_root / Path(folder).relative_to(driver_root))
    return spec.model_copy(update=moved)


def run_prefix(spec: RunSpec) -> str:
    return f"{spec.concept.id}--{spec.method.name}--"


def carry_stage_images(run_dir: Path, checkpoint: Path) -> None:
    """The stage images written so far (samples/stage-*, attention/stage-*) into the stage checkpoint, so that a
    run resumed on another node from Ray's copy has its earlier stages' pictures too."""
    for sub in ("samples", "attention"):
        for image in sorted((run_dir / sub).glob("stage-*.png")):
            (checkpoint / STAGE_IMAGES / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, checkpoint / STAGE_IMAGES / sub / image.name)


def checkpoint_name(spec: RunSpec, folder: Path) -> str:
    """Ray's name for a stage checkpoint: concept and method first, as one Train run may train several runs."""
    return run_prefix(spec) + folder.name


def restore_from_ray(spec: RunSpec) -> None:
    """After a worker restart, put the last reported stage checkpoint of this run back into its folder if missing."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    found = Path(checkpoint.path).name  # a copy from s3 comes down into a temporary folder of another name
    if not found.startswith(run_prefix(spec)):
        return
    target = spec.run_dir / "checkpoints" / found.removeprefix(run_prefix(spec))
    if (target / "cursor.json").is_file():
        return
    with checkpoint.as_directory() as source:
        shutil.copytree(source, target, dirs_exist_ok=True)
    if (target / NODE_RECORD).is_file():  # where the stages before it trained
        shutil.copy(target / NODE_RECORD, spec.run_dir / NODE_RECORD)
    if (target / STAGE_IMAGES).is_dir():  # the sample grids and attention maps of the stages before it
        shutil.copytree(target / STAGE_IMAGES, spec.run_dir, dirs_exist_ok=True)
    log.info("restored %s from the Ray checkpoint", target)


class StageReports:
    """The run's sink: losses to the tracker; each stage end to Ray Train with its checkpoint (from rank 0), with
    the trial's cheap evaluation measured just before. Step losses never go to Ray: a Ray Train report waits for
    every worker and the controller (about 2 s on a CPU node), ten times the step of a tiny run."""

    def __init__(self, spec: RunSpec, tracker, trial: TrialEvaluation | None, scorers, position: int):
        self.spec, self.tracker, self.trial, self.scorers, self.position = spec, tracker, trial, scorers, position
        self.measured: dict[str, Any] = {}

    def measure(self, ctx, index: int, stage) -> None:
        if self.trial is None:
            return
        from personalize.scoring import evaluate_in_training

        m = evaluate_in_training(ctx, self.trial.stage_eval, self.scorers, self.trial.stage_eval_prompts)
        self.measured = {"phase": "stage", "concept_index": self.position, "clip_t": m["clip_t"], "clip_i": m["clip_i"],
                         "dino": m["dino"], "objective": objective(m, self.trial.weights)}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step)

    def validated(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        """A validation point to the tracker and to Ray Train (every rank reports; rank 0 with the scores). In a
        sweep the point carries the trial's objective, so that ASHA can stop a trial between validation points."""
        report = {"phase": "validation", "step": step, "concept_index": self.position, **metrics}
        if metrics and self.trial is not None:
            scores = {k: metrics[f"val/{k}"] for k in VALIDATION_SCORES}
            report.update(scores, objective=objective(scores, self.trial.weights))
        ray.train.report(report)
        if self.tracker is not None and metrics:
            self.tracker.validated(step, metrics, grid)

    def stage_finished(self, index: int, stage, checkpoint: Path, seconds: float) -> None:
        metrics = {**self.measured, "stage_index": index, f"stage_seconds/{stage.name}": seconds}
        if ray.train.get_context().get_world_rank() == 0:
            write_node_record(self.spec.run_dir, stage.name, checkpoint)
            carry_stage_images(self.spec.run_dir, checkpoint)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint)),
                             checkpoint_dir_name=checkpoint_name(self.spec, checkpoint))
        else:
            ray.train.report(metrics)
        if self.tracker is not None:
            self.tracker.stage_finished(index, stage, checkpoint, seconds)


def read_node_record(folder: Path) -> dict:
    path = Path(folder) / NODE_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def write_node_record(run_dir: Path, stage: str | None = None, checkpoint: Path | None = None,
                      seconds: float | None = None) -> None:
    """Where the run trained, in its folder's node.json: the node this process runs on (id, address, host name;
    at the end, the node that finished the run, the seconds its worker spent on it and the workers that trained it
    data-parallel) and, by stage, the node
    that trained it. The record travels in each stage checkpoint too, so a run resumed on another node keeps where
    its earlier stages trained."""
    import socket

    record = read_node_record(run_dir)
    record.update(node_id=ray.get_runtime_context().get_node_id(), node_ip=ray.util.get_node_ip_address(),
                  hostname=socket.gethostname())
    if seconds is not None:
        from personalize.distributed import world

        record.update(seconds=round(seconds, 2), workers=world()[1])
    if stage is not None:
        record["stages"] = {**record.get("stages", {}), stage: record["node_id"]}
    text = json.dumps(record, indent=1) + "\n"
    (run_dir / NODE_RECORD).write_text(text)
    if checkpoint is not None:
        (checkpoint / NODE_RECORD).write_text(text)


def trained_on(run_dir: Path) -> str:
    """The node id that finished a run, or "" where none is recorded (a run of `personalize train`, or failed)."""
    return read_node_record(run_dir).get("node_id", "")


def settled_before(spec: RunSpec, root) -> bool:
    """A run of the task that finished, or failed on bad input, before this worker started (a restart after a
    crash or a lost node): it is not trained again. With an s3 root its folder is brought from the bucket."""
    rel = root.relative(spec.run_dir)
    if root.remote and read_done(spec.run_dir) is None and not root.pull(rel, marker=DONE):
        root.pull_file(f"{rel}/{FAILED}")
    done = read_done(spec.run_dir)
    if done is not None:
        return spec.owns(done["config_hash"])
    return spec.owns(failure_hash(spec.run_dir))


def train_loop_per_worker(config: dict) -> None:
    import time

    from personalize.runners import runner_for
    from pipelines.storage import StorageRoot

    load_plugins()  # a method's own registered functions, before its specs are read
    task = WorkerTask.model_validate_json(config["task"])
    root = StorageRoot(task.storage)
    task = task.model_copy(update={"specs": [on_this_node(spec, root, task.driver_root) for spec in task.specs]})
    main = ray.train.get_context().get_world_rank() == 0
    trial, scorers = task.trial, _scorers(task.trial)
    trial_tracker = _trial_tracker(task)
    for position, spec in enumerate(task.specs):
        if settled_before(spec, root):
            continue
        began = time.perf_counter()
        restore_from_ray(spec)
        tracker = trial_tracker or _run_tracker(task, spec)
        if trial_tracker is not None and len(task.specs) > 1:
            trial_tracker.prefix = f"{spec.concept.id}/"
        reports = StageReports(spec, tracker, trial, scorers, position)
        try:
            runner_for(spec.method.name)(spec, sink=reports, progress=False, on_stage_end=reports.measure, resume=True)
        except BAD_INPUT as e:
            if main:
                write_failed(spec.run_dir, str(e), spec.config_hash())
                root.push_file(f"{root.relative(spec.run_dir)}/{FAILED}")  # the driver may be on another node
                if tracker is not None:
                    tracker.finish(spec.run_dir, "FAILED", str(e))
            if trial is not None:
                raise
            continue
        if main:
            write_node_record(spec.run_dir, seconds=time.perf_counter() - began)
            root.push(root.relative(spec.run_dir), marker=DONE)  # an s3 root gets the finished folder, marker last
        if tracker is not None and trial_tracker is None:
            tracker.finish(spec.run_dir, "FINISHED")
    if trial is not None:
        final_report(task, scorers, trial_tracker)


def final_report(task: WorkerTask, scorers, tracker) -> None:
    """The trial's full evaluation, averaged over its runs: the last report, the one the sweep ranks."""
    from personalize.evaluation import evaluate_run

    trial = task.trial
    reuse = scorers if trial.final_eval.clip == trial.stage_eval.clip else None
    finals = [evaluate_run(spec.run_dir, trial.final_eval, reuse, progress=False).metrics for spec in task.specs]
    mean = {k: sum(m[k] for m in finals) / len(finals) for k in ("clip_t", "clip_i", "dino")}
    if tracker is not None:
        tracker.prefix = ""
        tracker.log_metrics({f"eval/{k}": v for k, v in mean.items()}, 0)
        tracker.finish(task.specs[0].run_dir, "FINISHED")
    ray.train.report({"phase": "final", "concept_index": len(task.specs), "stage_index": -1, **mean,
                      "objective": objective(mean, trial.weights)})


def _scorers(trial: TrialEvaluation | None):
    if trial is None:
        return None
    import torch

    from personalize.scoring import Scorers

    return Scorers(trial.stage_eval.clip, trial.stage_eval.dino, "cuda" if torch.cuda.is_available() else "cpu")


def _run_tracker(task: WorkerTask, spec: RunSpec):
    if not task.tracking:
        return None
    from pipelines.tracking import RunTracker

    return RunTracker.for_worker(task.tracking, spec)


def _trial_tracker(task: WorkerTask):
    """A sweep's trial logs all of its runs into one MLflow child run of the sweep."""
    if task.trial is None or not task.tracking:
        return None
    from pipelines.tracking import RunTracker

    trial_id = task.trial.trial_id
    return RunTracker(task.tracking, task.specs[0], key=f"trial/{trial_id}", name=f"trial {trial_id}",
                      extra_params={"overrides": task.trial.overrides}, extra_tags={"trial_id": trial_id})
