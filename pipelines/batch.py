"""`personalize batch CONFIG [overrides]` (also `python -m pipelines.batch`): the product's main job.

prepare (Ray Data: validate images, encode latents, class priors) -> train (Ray Train, one Train run per
pack of concept x method runs) -> evaluate (Ray Data: actors that sample and score each run) -> results table.

Without a cluster it starts a local Ray in-process; under `ray job submit` (or with RAY_ADDRESS) it joins the
cluster. Resubmitting the same config skips finished runs and resumes unfinished ones. Exits non-zero only
when the config is invalid or every run failed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from personalize.errors import ModelUnavailableError
from personalize.evaluation import FLOOR_FOLDER
from personalize.run_folder import DONE
from personalize.run_settings import RunSpec
from pipelines.cluster import capacity, concurrent_runs, connect, forwarded_env
from pipelines.command import config_parser, run_command
from pipelines.config import BatchConfig, load_batch, resolve_batch, split_manifest
from pipelines.preflight import check_batch_resources
from pipelines.redaction import redact
from pipelines.results import IDENTITY_BOUNDS, results_frame, to_markdown, write_results

log = logging.getLogger(__name__)


def result_rows(specs, bad: dict[str, str], outcomes, evaluations, eval_error: str) -> list[dict]:
    from pipelines.worker import trained_on

    by_run = {str(o.spec.run_dir): o for o in outcomes}
    rows = []
    for spec in specs:
        row = {"concept": spec.concept.id, "method": spec.method.name, "run_dir": str(spec.run_dir),
               "stage_seconds": "{}", "train_seconds": 0.0, "reason": "", "report": ""}
        if spec.concept.id in bad:
            rows.append({**row, "status": "failed", "reason": redact(bad[spec.concept.id])})
            continue
        outcome = by_run[str(spec.run_dir)]
        row.update(status=outcome.status, reason=redact(outcome.reason), train_seconds=round(outcome.seconds, 2),
                   stage_seconds=json.dumps(outcome.stage_seconds),
                   node=trained_on(spec.run_dir) if outcome.status != "failed" else "")
        evaluation = evaluations.get(str(spec.run_dir))
        if evaluation is not None:
            m = evaluation.metrics
            row.update(clip_t=m["clip_t"], clip_i=m["clip_i"], dino=m["dino"], report=str(evaluation.folder / "report.html"),
                       **{key: m.get(key, float("nan")) for key in IDENTITY_BOUNDS})
        elif outcome.status != "failed" and eval_error:
            row["reason"] = redact(f"not evaluated: {eval_error}")
        rows.append(row)
    return rows


def manifest_rows(bad: dict[str, str], methods: list[str]) -> list[dict]:
    """Failed rows for the manifest's bad concepts, one per method, so the table says what happened to each."""
    return [{"concept": label, "method": method, "status": "failed", "reason": redact(f"bad manifest row: {reason}"),
             "run_dir": "", "stage_seconds": "{}", "train_seconds": 0.0, "report": ""}
            for label, reason in bad.items() for method in methods]


@dataclass
class BatchPlan:
    """A batch whose configuration is known good: every run resolved, the manifest's bad rows set apart."""

    config: BatchConfig  # the manifest's good concepts inline
    specs: list[RunSpec]
    manifest_bad: dict[str, str]  # concept label -> reason


def plan_batch(config: BatchConfig, base_dir: Path) -> BatchPlan:
    """Every run of the grid resolved (each method file, override and concept validated), creating nothing: a
    config error surfaces here, before Ray starts or a tracking run is opened."""
    from pipelines.storage import StorageRoot

    root = StorageRoot(config.storage)  # paths only: nothing is created or fetched
    config, manifest_bad = split_manifest(config, base_dir)
    specs = resolve_batch(config, base_dir, str(root.local("runs")), str(root.local("cache")))
    return BatchPlan(config, specs, manifest_bad)


def run_batch(config: BatchConfig, base_dir: Path, tracker=None) -> int:
    return execute_batch(plan_batch(config, base_dir), tracker)


def execute_batch(plan: BatchPlan, tracker=None) -> int:
    """Runs the plan; if it breaks part-way, Ray's worker logs are still copied under the storage root."""
    from pipelines.ray_logs import WorkerLogs
    from pipelines.storage import StorageRoot

    worker_logs = WorkerLogs()
    try:
        return _execute(plan, tracker, worker_logs)
    except Exception:
        logs = worker_logs.save(StorageRoot(plan.config.storage))
        if logs is not None:
            print(f"Ray's worker logs: {logs}", flush=True)
        raise


def _execute(plan: BatchPlan, tracker, worker_logs) -> int:
    from personalize.models import resolve_model_path
    from personalize.outcome import RunOutcome
    from pipelines.evaluate import evaluate_runs
    from pipelines.prepare import encode_latents, generate_priors, refuse_runs, validate_concepts
    from pipelines.storage import StorageRoot
    from pipelines.train import train_runs

    began = time.perf_counter()
    config, specs, manifest_bad = plan.config, plan.specs, plan.manifest_bad
    root = StorageRoot(config.storage)
    if not root.remote and os.environ.get("RAY_JOB_ID") and not Path(config.storage).is_absolute():
        log.warning("storage %r is relative: under `ray job submit` it lands in the job's temporary working "
                    "directory; use an absolute path or s3://bucket/prefix", config.storage)
    for label, reason in manifest_bad.items():
        log.error("skipping concept %s: %s", label, redact(reason))
    print(f"{len(specs)} runs ({len({s.concept.id for s in specs})} concepts x {len(config.methods)} methods); "
          f"storage {root.uri()}; {connect()}", flush=True)
    worker_logs.start()
    quiet_ray_data()
    cap = capacity()
    res = config.resources
    actors = max(1, min(res.data_actors, int(cap.gpus) if cap.use_gpu else res.data_actors))
    bad = validate_concepts(specs)
    good = [s for s in specs if s.concept.id not in bad]
    refused: dict[str, str] = {}
    if good:
        model_path = resolve_model_path(config.model)
        refused = refuse_runs(good, model_path)
        good = [s for s in good if str(s.run_dir) not in refused]
    if good:
        encoded = encode_latents(good, config.model, model_path, actors, cap.use_gpu)
        made = generate_priors(good, model_path, config.model, actors, cap.use_gpu, root)
        print(f"prepared: {len(bad)} bad concept(s) skipped, " + (f"{len(refused)} run(s) refused, " if refused else "")
              + f"{encoded} instance latent set(s) encoded, {made} class-prior set(s) generated", flush=True)
    workers = max(1, res.gpus_per_run) if cap.use_gpu else 1
    scaling = {"num_workers": workers, "use_gpu": cap.use_gpu,
               "resources_per_worker": {"CPU": res.cpus_per_run, **({"GPU": 1} if cap.use_gpu else {})}}
    concurrency = concurrent_runs(cap, res.gpus_per_run, res.cpus_per_run, res.max_concurrent_runs)
    tracking = tracker.worker_settings() if tracker else None
    outcomes = [RunOutcome(s, "failed", refused[str(s.run_dir)]) for s in specs if str(s.run_dir) in refused]
    outcomes += train_runs(good, scaling, config.storage, concurrency, res.max_failures, forwarded_env(), tracking,
                           res.runs_per_trainer)
    usable = [o.spec for o in outcomes if o.status in ("finished", "skipped")]
    evaluations, eval_error = {}, ""
    if config.evaluation is not None and usable:
        print(f"evaluating {len(usable)} run(s): each concept's identity floor and ceiling, then samples and scores",
              flush=True)
        try:
            evaluations = evaluate_runs(usable, config.evaluation, actors, cap.use_gpu, config.storage)
        except Exception as e:  # scorers missing, for instance: the trained runs still stand
            eval_error = _root_cause(e)
            log.error("evaluation failed: %s", eval_error)
    frame = results_frame(result_rows(specs, bad, outcomes, evaluations, eval_error) + manifest_rows(manifest_bad, config.methods))
    paths = write_results(frame, root.local("results"))
    if len(evaluations) > 1:
        from personalize.report import write_comparison

        write_comparison(list(evaluations.values()), root.local("results", "comparison"))
    for spec in usable:  # evaluations land in the run folders
        root.push(root.relative(spec.run_dir), marker=DONE)
    for concept_dir in {spec.run_dir.parent for spec in usable}:  # each concept's identity floor, shared by its methods
        if (concept_dir / FLOOR_FOLDER).is_dir():
            root.push(root.relative(concept_dir / FLOOR_FOLDER))
    root.push("results")
    logs = worker_logs.save(root)
    if tracker is not None:
        tracker.batch_finished(frame, evaluations, paths, specs, logs)
    print("\n" + to_markdown(frame))
    print(f"results: {paths['markdown']} and {paths['parquet']} ({time.perf_counter() - began:.0f} s)", flush=True)
    if logs is not None:
        print(f"Ray's worker logs: {logs}", flush=True)
    if eval_error:
        print(f"evaluation failed: {eval_error}\nthe trained runs are kept: fix the evaluation settings and "
              "resubmit, only the evaluation runs again", flush=True)
    return 0 if (frame["status"] != "failed").any() else 1


def quiet_ray_data() -> None:
    import ray.data

    from pipelines.cluster import verbose

    # first the level: turning the bars off is itself announced as a warning
    logging.getLogger("ray.data").setLevel(logging.WARNING if verbose() else logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _root_cause(error: Exception) -> str:
    """Ray wraps actor errors; the user needs the innermost message (e.g. which scorer model is missing)."""
    text = str(error)
    for marker in (ModelUnavailableError.__name__ + ":", "PersonalizeError:"):
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = config_parser("personalize batch", __doc__, [
        "personalize batch configs/batch/demo.yaml",
        "personalize batch my_batch.yaml resources.max_concurrent_runs=4 storage=s3://bucket/prefix"],
        "batch YAML", "dotted overrides, e.g. resources.max_concurrent_runs=2").parse_args(argv)

    def work() -> int:
        config, base_dir = load_batch(args.config, args.overrides)
        check_batch_resources(config, args.config)  # before Ray or a tracking run starts
        from pipelines.tracking import tracker_for

        plan = plan_batch(config, base_dir)  # a config error ends here: no tracking run is left behind
        with tracker_for(config) as tracker:
            return execute_batch(plan, tracker)

    return run_command(work, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
