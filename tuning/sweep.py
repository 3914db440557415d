"""`personalize sweep SWEEP.yaml` (also under `ray job submit`): Ray Tune over dotted config paths of one
method's single-run training, ASHA between stages, Optuna (also multi-objective), MLflow (a sweep parent run,
one child per trial), the best configuration exported as a ready-to-run experiment YAML, and a Pareto plot
of text alignment vs identity. Resubmitting an interrupted sweep restores it (`Tuner.restore`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from personalize.errors import PersonalizeError
from pipelines.command import config_parser, run_command
from pipelines.preflight import check_batch_resources
from tuning.config import SweepConfig, TrialSettings, load_sweep
from tuning.progress import SweepProgress
from tuning.trial import TIMED_OUT, trial

log = logging.getLogger(__name__)


def domain(spec: dict):
    from ray import tune

    kind, values = next(iter(spec.items()))
    return {
        "grid": lambda: tune.grid_search(values), "choice": lambda: tune.choice(values),
        "uniform": lambda: tune.uniform(*values), "loguniform": lambda: tune.loguniform(*values),
        "randint": lambda: tune.randint(values[0], values[1] + 1), "qrandint": lambda: tune.qrandint(*values),
    }[kind]()


def reports_per_trial(specs) -> int:
    """Stage boundaries and validation points of every concept plus the final evaluation: ASHA's time axis."""
    from personalize.validation import Schedule

    def points(spec) -> int:
        return Schedule(spec.validation, sum(s.steps for s in spec.method.stages)).points() if spec.validation else 0

    return sum(len(s.method.stages) + points(s) for s in specs) + 1


def search_algorithm(sweep: SweepConfig):
    from ray.tune.search import ConcurrencyLimiter

    if sweep.search.algorithm != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    if sweep.objective.multi:
        searcher = OptunaSearch(metric=list(sweep.objective.metrics), mode=["max"] * len(sweep.objective.metrics), seed=sweep.search.seed)
    else:
        searcher = OptunaSearch(metric="objective", mode="max", seed=sweep.search.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=sweep.search.max_concurrent)


def scheduler(sweep: SweepConfig, max_t: int):
    if sweep.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", metric="objective", mode="max", max_t=max_t,
                         grace_period=sweep.scheduler.grace_period, reduction_factor=sweep.scheduler.reduction_factor)


def reached_final(metrics: dict) -> bool:
    """A trial finished when it made its final report. Counting reports is not enough: a trial restored after an
    interruption skips the stages it had finished and reports only what is left."""
    return metrics.get("phase") == "final"


def remove_trial_runs(root, sweep_name: str, trial_id: str, runs: list[str]) -> None:
    """A stopped trial leaves no checkpoints behind, here or in the bucket (its results stay). `runs` are the
    trial's run folders below trials/<id>/runs ('<concept>/<method>'): one that finished is kept, since a trial
    counts as stopped also when the sweep was interrupted after its last step and before Tune heard of it."""
    from personalize import storage
    from personalize.run_folder import DONE

    def finished(rel: str) -> bool:
        return root.local(rel, DONE).is_file() or (root.remote and storage.exists(root.uri(rel, DONE)))

    unfinished = [f"trials/{trial_id}/runs/{run}" for run in runs if not finished(f"trials/{trial_id}/runs/{run}")]
    for rel in unfinished if len(unfinished) < len(runs) else [f"trials/{trial_id}/runs"]:
        root.remove_tree(rel)
    root.remove_tree(f"ray/{sweep_name}-{trial_id}")


def trial_run_names(specs, root) -> list[str]:
    """Where each of a trial's runs sits below its trials/<id>/runs folder."""
    base = root.local("trials", "_", "runs")
    return [str(Path(s.run_dir).relative_to(base)) for s in specs]


def cleanup_callback(root, sweep_name: str, runs: list[str]):
    """Frees a stopped trial's space as soon as Tune stops it. Its Train worker ends with the trial's process, a
    moment later, and may still write a file meanwhile: the sweep removes stopped trials' runs once more at its end."""
    from ray.tune import Callback

    class CleanupStopped(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if not reached_final(trial.last_result):
                remove_trial_runs(root, sweep_name, trial.trial_id, runs)

    return CleanupStopped()


def pareto(frame: pd.DataFrame, x: str = "clip_t", y: str = "dino") -> pd.DataFrame:
    """Trials no other trial beats on both axes (maximising both)."""
    points = frame[[x, y]].to_numpy()
    keep = [not any((o >= p).all() and (o > p).any() for o in points) for p in points]
    return frame[keep].sort_values(x)


def pareto_plot(frame: pd.DataFrame, front: pd.DataFrame, best: pd.Series | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(frame["clip_t"], frame["dino"], color="grey", alpha=0.6, label="trials")
    ax.plot(front["clip_t"], front["dino"], "o-", color="tab:red", label="Pareto front")
    if best is not None:
        ax.scatter([best["clip_t"]], [best["dino"]], marker="*", s=260, color="gold", edgecolor="black", label="best", zorder=5)
    ax.set_xlabel("CLIP-T (raw cosine): text alignment")
    ax.set_ylabel("DINO (raw cosine): identity")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_experiment(batch, base_dir: Path, overrides: dict) -> dict:
    """A ready-to-run experiment file: the batch's model, method and concepts with the winning overrides."""
    concepts = batch.concepts if isinstance(batch.concepts, str) else [c.model_dump(exclude_none=True) for c in batch.concepts]
    if isinstance(concepts, str) and not concepts.startswith(("/", "s3://")):
        concepts = str((base_dir / concepts).resolve())
    model = batch.model if batch.model.startswith(("/", "s3://")) or not Path(base_dir / batch.model).exists() else str((base_dir / batch.model).resolve())
    return {"model": model, "method": batch.methods[0], "concepts": concepts, "output_dir": "outputs/best",
            "seed": batch.seed, "resolution": batch.resolution, "latent_variants": batch.latent_variants,
            "steps_scale": batch.steps_scale, "overrides": {**batch.method_overrides.get(batch.methods[0], {}), **overrides}}


def run_sweep(sweep: SweepConfig, batch, base_dir: Path, tracker=None) -> int:
    from ray import tune

    from pipelines.batch import quiet_ray_data
    from pipelines.cluster import capacity, connect, forwarded_env, verbose
    from pipelines.config import resolve_batch
    from pipelines.ray_logs import WorkerLogs
    from pipelines.storage import StorageRoot

    began = time.perf_counter()
    root = StorageRoot(batch.storage)
    print(f"sweep {sweep.name}: {connect()}", flush=True)
    worker_logs = WorkerLogs()
    worker_logs.start()
    quiet_ray_data()
    cap = capacity()
    specs = resolve_batch(batch, base_dir, str(root.local("trials", "_", "runs")), str(root.local("cache")))
    total = reports_per_trial(specs)
    stage_eval = sweep.stage_eval or batch.evaluation
    if stage_eval is None or batch.evaluation is None:
        raise PersonalizeError("a sweep needs an evaluation (the batch's `evaluation`, or `stage_eval`) to rank trials")
    settings = TrialSettings(
        name=sweep.name, batch=batch, base_dir=str(base_dir), stage_eval=stage_eval, final_eval=batch.evaluation,
        stage_eval_prompts=sweep.stage_eval_prompts, weights=dict(sweep.objective.weights),
        trial_timeout_s=sweep.budget.trial_timeout_s,
        report_timeout_s=sweep.budget.report_timeout_s, env=forwarded_env(),
        scaling={"num_workers": 1, "use_gpu": cap.use_gpu,
                 "resources_per_worker": {"CPU": batch.resources.cpus_per_run, **({"GPU": 1} if cap.use_gpu else {})}},
        tracking=tracker.worker_settings() if tracker else None,
    )
    space = {"settings": settings.model_dump_json(), "overrides": {k: domain(v) for k, v in sweep.space.items()}}
    storage_path, filesystem = root.ray_storage("tune")
    path = f"{storage_path}/{sweep.name}"
    trainable = tune.with_resources(trial, {"CPU": 0.1})
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        print(f"restoring the interrupted sweep at {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False, restart_errored=True,
                                   storage_filesystem=filesystem)
    else:
        search = search_algorithm(sweep)
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
            search_alg=search, scheduler=scheduler(sweep, total), num_samples=sweep.search.samples,
            max_concurrent_trials=sweep.search.max_concurrent, time_budget_s=sweep.budget.time_budget_s),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage_path, storage_filesystem=filesystem,
                                      callbacks=[cleanup_callback(root, sweep.name, trial_run_names(specs, root)),
                                                 SweepProgress()],
                                      verbose=None if verbose() else 0))  # Tune's own trial table with -v
    grid = tuner.fit()
    frame = trials_frame(grid, root)
    for trial_id in frame.loc[frame["status"] == "stopped", "trial_id"]:
        remove_trial_runs(root, sweep.name, trial_id, trial_run_names(specs, root))
    return write_results(sweep, batch, base_dir, frame, root, tracker, time.perf_counter() - began, worker_logs.save(root))


def trials_frame(grid, root) -> pd.DataFrame:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.split("_")[-1]
        root.pull_file(f"trials/{trial_id}/{TIMED_OUT}")  # written where the trial ran
        note = root.local("trials", trial_id, TIMED_OUT)
        timed_out = note.is_file()
        iterations = metrics.get("training_iteration", 0)
        status = "timed out" if timed_out else "error" if result.error else "finished" if reached_final(metrics) else "stopped"
        overrides = (result.config or {}).get("overrides", {})
        rows.append({"trial_id": trial_id, "status": status, "reports": iterations, "phase": metrics.get("phase"),
                     "clip_t": metrics.get("clip_t"), "clip_i": metrics.get("clip_i"), "dino": metrics.get("dino"),
                     "objective": metrics.get("objective"), "overrides": json.dumps(overrides, sort_keys=True),
                     "error": note.read_text().strip() if timed_out else str(result.error)[:500] if result.error else ""})
    return pd.DataFrame(rows)


def write_results(sweep: SweepConfig, batch, base_dir: Path, frame: pd.DataFrame, root, tracker, seconds: float,
                  logs: Path | None = None) -> int:
    out = root.local("sweeps", sweep.name)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "trials.csv", index=False)
    finished = frame[frame["status"] == "finished"].dropna(subset=["clip_t", "dino"])
    best, paths = None, {"trials": out / "trials.csv"}
    if not finished.empty:
        front = pareto(finished)
        front.to_csv(out / "pareto.csv", index=False)
        best = front.loc[(front["clip_t"] + front["dino"]).idxmax()] if sweep.objective.multi else finished.loc[finished["objective"].idxmax()]
        paths["pareto"] = pareto_plot(finished, front, best, out / "pareto.png")
        experiment = best_experiment(batch, base_dir, json.loads(best["overrides"]))
        (out / "best_experiment.yaml").write_text(f"# best trial {best['trial_id']} of sweep {sweep.name}: "
                                                  f"CLIP-T {best['clip_t']:.4f}, DINO {best['dino']:.4f}\n" + yaml.safe_dump(experiment, sort_keys=False))
        paths["best"] = out / "best_experiment.yaml"
    root.push(f"sweeps/{sweep.name}")
    if tracker is not None:
        tracker.sweep_finished(frame, paths, logs)
    print(frame[["trial_id", "status", "reports", "clip_t", "dino", "objective", "overrides"]].to_string(index=False))
    if best is not None:
        print(f"\nbest trial {best['trial_id']}: {best['overrides']}\nready to run: personalize train {paths['best']}")
    print(f"sweep finished in {seconds / 60:.1f} min; results in {out}", flush=True)
    if logs is not None:
        print(f"Ray's worker logs: {logs}", flush=True)
    return 0 if best is not None else 1


def main(argv: list[str] | None = None) -> int:
    args = config_parser("personalize sweep", __doc__, [
        "personalize sweep configs/sweeps/demo_rare.yaml",
        "personalize sweep configs/sweeps/world_core.yaml storage=s3://bucket/sweeps"],
        "sweep YAML", "overrides of the base batch config").parse_args(argv)

    def work() -> int:
        sweep, batch, base = load_sweep(args.config, args.overrides)
        check_batch_resources(batch, args.config)  # before Ray or a tracking run starts
        from tuning.tracking import sweep_tracker

        with sweep_tracker(sweep, batch) as tracker:
            return run_sweep(sweep, batch, base, tracker)

    return run_command(work, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
