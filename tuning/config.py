"""The sweep file: a base batch config, a search space over dotted config paths, the search algorithm, the
scheduler, the objective, the cheap per-stage evaluation and the guards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from personalize.config import read_yaml, resolve_model, validate
from personalize.errors import ConfigError
from personalize.method_spec import Strict
from personalize.run_settings import EvaluationSpec
from pipelines.config import BatchConfig, load_batch

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint", "qrandint")


class SearchSpec(Strict):
    algorithm: Literal["grid", "random", "optuna"] = "random"
    samples: int = Field(default=4, ge=1)  # trials (grid: repeats of the whole grid)
    max_concurrent: int = Field(default=2, ge=1)
    seed: int = 0


class SchedulerSpec(Strict):
    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1)  # reports (stage boundaries) before a trial may be stopped
    reduction_factor: int = Field(default=2, ge=2)


class ObjectiveSpec(Strict):
    """A scalar (weighted sum of eval scores, maximised) or two objectives (a Pareto front, Optuna only)."""

    weights: dict[Literal["clip_t", "clip_i", "dino"], float] = {"clip_t": 1.0, "dino": 1.0}
    metrics: list[Literal["clip_t", "clip_i", "dino"]] | None = None

    @property
    def multi(self) -> bool:
        return self.metrics is not None and len(self.metrics) > 1


class BudgetSpec(Strict):
    time_budget_s: float | None = Field(default=None, gt=0)  # the whole sweep
    trial_timeout_s: float = Field(default=1800, gt=0)  # a trial still running after this is failed
    # once a trial has reported, a silence longer than this fails it as hung (None: only trial_timeout_s applies);
    # set it above the longest stage (or validation interval) of a trial
    report_timeout_s: float | None = Field(default=None, gt=0)


class SweepConfig(Strict):
    name: str
    batch: str  # a batch config: model, method(s), concepts, storage, evaluation (the final one), tracking
    method: str | None = None  # which of the batch's methods to tune (required when it lists several)
    space: dict[str, dict[str, Any]] = Field(min_length=1)
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    stage_eval: EvaluationSpec | None = None  # default: the batch's evaluation, 1 sample of 4 prompts
    stage_eval_prompts: int = Field(default=4, ge=1)
    budget: BudgetSpec = BudgetSpec()

    @model_validator(mode="after")
    def _checks(self) -> SweepConfig:
        for key, domain in self.space.items():
            if len(domain) != 1 or next(iter(domain)) not in DOMAINS:
                raise ValueError(f"space.{key}: give exactly one of {DOMAINS}, e.g. {{choice: [100, 200]}}")
            kind, values = next(iter(domain.items()))
            if kind in ("uniform", "loguniform", "randint") and (not isinstance(values, list) or len(values) != 2):
                raise ValueError(f"space.{key}: {kind} takes [low, high]")
        if self.objective.multi and self.search.algorithm != "optuna":
            raise ValueError("two objectives need search.algorithm: optuna (a Pareto front)")
        if self.objective.multi and self.scheduler.type == "asha":
            raise ValueError("ASHA stops trials on one scalar: use scheduler.type: none with two objectives")
        return self


class TrialSettings(Strict):
    """What the sweep's driver hands every trial, typed end to end: the batch (its one tuned method), where its
    relative paths start, how a trial is measured and ranked, and the trial's resources and limits."""

    name: str
    batch: BatchConfig
    base_dir: str
    stage_eval: EvaluationSpec
    final_eval: EvaluationSpec
    stage_eval_prompts: int = Field(ge=1)
    weights: dict[str, float]
    trial_timeout_s: float = Field(gt=0)
    report_timeout_s: float | None = Field(default=None, gt=0)
    env: dict[str, str] = {}  # forwarded to the trial's Train workers (no credentials: see pipelines/cluster.py)
    scaling: dict[str, Any]  # Ray Train ScalingConfig arguments
    tracking: dict | None = None  # RunTracker settings of the sweep's parent run

    def trial_batch(self, overrides: dict[str, Any]) -> BatchConfig:
        """The batch with a trial's sampled overrides: method keys go to the tuned method, the rest to the batch;
        validated again, so a sampled value out of range is the trial's error, with the key named."""
        from personalize.config import apply_overrides, split_overrides

        method_over, batch_over = split_overrides(overrides)
        method = self.batch.methods[0]
        data = apply_overrides(self.batch.model_dump(mode="json"), batch_over, f"sweep {self.name} (trial overrides)")
        data["method_overrides"] = {**self.batch.method_overrides, method: {**self.batch.method_overrides.get(method, {}), **method_over}}
        return validate(BatchConfig, data, f"sweep {self.name} (trial overrides)")


def load_sweep(path: str | Path, cli_overrides: list[str] | None = None) -> tuple[SweepConfig, BatchConfig, Path]:
    path = Path(path)
    raw = read_yaml(path)
    sweep = validate(SweepConfig, raw, str(path))
    batch_path = Path(resolve_model(sweep.batch, path.parent))
    batch, base = load_batch(batch_path, cli_overrides)
    method = sweep.method or (batch.methods[0] if len(batch.methods) == 1 else None)
    if method is None:
        raise ConfigError(str(path), [f"method: the batch lists {batch.methods}; name the one to tune"])
    if method not in batch.methods:
        raise ConfigError(str(path), [f"method: {method!r} is not among the batch's methods {batch.methods}"])
    batch = batch.model_copy(update={"methods": [method]})
    if sweep.stage_eval is None and batch.evaluation is not None:
        sweep = sweep.model_copy(update={"stage_eval": batch.evaluation.model_copy(update={"samples": 1})})
    return sweep, batch, base
