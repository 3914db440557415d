"""The batch configuration: the concept x method grid, evaluation, resources and storage. Strict like the
experiment config: unknown keys are errors and every problem is reported at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from personalize.config import (
    apply_overrides,
    available_methods,
    method_path,
    parse_override,
    read_manifest,
    read_yaml,
    resolve_model,
    resolve_runs,
    validate,
)
from personalize.errors import ConfigError
from personalize.method_spec import Strict
from personalize.run_settings import ConceptRuns, EvaluationSpec, ExperimentConfig, RunSpec
from personalize.storage import is_s3
from pipelines.tracking import TrackingSpec


class ResourceSpec(Strict):
    gpus_per_run: int = Field(default=1, ge=0)  # Ray Train workers per run when the cluster has GPUs (one GPU each)
    cpus_per_run: float = Field(default=1.0, gt=0)  # CPU per worker (the only resource when the cluster has no GPU)
    max_concurrent_runs: int | None = Field(default=None, ge=1)  # default: what the cluster can hold at once
    max_failures: int = Field(default=1, ge=0)  # restarts of a run's workers after a crash (resume from checkpoint)
    runs_per_trainer: int | None = Field(default=None, ge=1)  # runs one Ray Train run trains in turn; default: packs
    # of up to 8 that fill every concurrent slot (1: a Train run per run)
    data_actors: int = Field(default=1, ge=1)  # Ray Data actor pool size (latents, class priors, sampling, scoring)


INHERITED_BY_VALIDATION = ("prompts", "clip", "dino", "scheduler", "steps", "guidance_scale", "eta", "text_mode",
                           "exclude_tags")


class BatchConfig(ConceptRuns):
    """The concept x method grid of `personalize batch`: the shared run settings, plus per-method overrides,
    storage, evaluation, resources and tracking."""

    name: str = "personalize-batch"  # the MLflow experiment and the Ray job's run names
    methods: list[str] = Field(min_length=1)
    method_overrides: dict[str, dict[str, Any]] = {}  # per method: dotted overrides (stages.<name>.steps: 100)
    storage: str = "outputs/batch"  # a local folder or s3://bucket/prefix
    evaluation: EvaluationSpec | None = EvaluationSpec()
    resources: ResourceSpec = ResourceSpec()
    tracking: TrackingSpec = TrackingSpec()

    @model_validator(mode="after")
    def _validation_scores_like_the_evaluation(self) -> BatchConfig:
        """Validation settings the batch leaves unset (scorers, prompt set, sampler) are the evaluation's."""
        if self.validation is not None and self.evaluation is not None:
            inherited = {k: getattr(self.evaluation, k) for k in INHERITED_BY_VALIDATION
                         if k not in self.validation.model_fields_set}
            self.validation = self.validation.model_copy(update=inherited)
        return self

    def experiment(self, method: str, output_dir: str, cache_dir: str) -> ExperimentConfig:
        return ExperimentConfig(
            **self.shared(), method=method, output_dir=output_dir, prior_cache_dir=f"{cache_dir}/class_priors",
            latent_cache_dir=f"{cache_dir}/latents", overrides=self.method_overrides.get(method, {}),
        )


def load_batch(path: str | Path, cli_overrides: list[str] | None = None) -> tuple[BatchConfig, Path]:
    """The batch config with command-line overrides applied (`resources.max_concurrent_runs=2`)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["expected a mapping at the top level"])
    overrides = dict(parse_override(o) for o in cli_overrides or [])
    if overrides:
        raw = apply_overrides(raw, overrides, f"{path} (with overrides)")
    config = validate(BatchConfig, raw, str(path))
    problems = [f"methods: unknown method {m!r}; available: {', '.join(available_methods())}"
                for m in config.methods if not method_path(m).is_file()]
    unknown = [m for m in config.method_overrides if m not in config.methods]
    if unknown:
        problems.append(f"method_overrides names methods not in `methods`: {unknown}")
    if problems:
        raise ConfigError(str(path), problems)
    config.model = resolve_model(config.model, path.parent)  # ./ or ../ paths are relative to this file
    if config.evaluation is not None:  # so are scorer folders
        config.evaluation = config.evaluation.model_copy(update={
            "clip": resolve_model(config.evaluation.clip, path.parent), "dino": resolve_model(config.evaluation.dino, path.parent)})
    if config.validation is not None:
        config.validation = config.validation.model_copy(update={
            "clip": resolve_model(config.validation.clip, path.parent), "dino": resolve_model(config.validation.dino, path.parent)})
    return config, path.parent


def split_manifest(config: BatchConfig, base_dir: Path) -> tuple[BatchConfig, dict[str, str]]:
    """A manifest's bad rows (unsafe or duplicate id, unknown kind, ...) fail only their concept: the config with
    the good concepts inline, and label -> reason for the others. With no good concept at all the batch is refused."""
    if not isinstance(config.concepts, str):
        return config, {}
    path = config.concepts if is_s3(config.concepts) else Path(config.concepts)
    path = path if is_s3(path) or path.is_absolute() else (base_dir / path).resolve()
    good, bad = read_manifest(path)
    if not good:
        raise ConfigError(str(path), [f"concept {label}: {reason}" for label, reason in bad.items()])
    return config.model_copy(update={"concepts": good}), bad


def resolve_batch(config: BatchConfig, base_dir: Path, runs_dir: str, cache_dir: str) -> list[RunSpec]:
    """The concept x method grid as RunSpecs (every method file validated before anything runs)."""
    specs, problems = [], []
    for method in config.methods:
        try:
            specs += resolve_runs(config.experiment(method, runs_dir, cache_dir), base_dir)
        except ConfigError as e:
            problems += [f"{method}: {p}" for p in e.problems]
    if problems:
        raise ConfigError("batch config", problems)
    return specs
