"""MLflow tracking: an experiment per batch, a parent run per batch (or sweep), a child run per (concept,
method) logged from Ray Train rank 0, models registered with an alias for the best run of each concept.

Without a configured server the store is local: ./mlruns/mlflow.db with artifacts in ./mlruns/artifacts
(`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`). MLflow 3 refuses the old file store.
Secrets never reach MLflow: every parameter, tag and reason is redacted first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from personalize import __version__
from personalize.run_folder import RESOLVED_CONFIG
from pipelines.redaction import SECRET_KEY, redact

log = logging.getLogger(__name__)

RUN_KEY, BATCH_KEY = "personalize.run_key", "personalize.batch_key"


class TrackingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else the local ./mlruns store
    experiment: str | None = None  # default: the batch name
    register_models: bool = True
    best_metric: str = "eval/dino"  # the alias goes to the run of each concept with the highest value
    alias: str = "champion"
    log_every: int = 10  # per-step losses are sent in batches of this many steps


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"method.stages.identity.steps": "200", ...}; stages keyed by name; secrets masked."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(i, dict) and "name" in i for i in data):
        for item in data:
            out.update(flatten(item, f"{prefix}{item['name']}."))
    else:
        key = prefix.rstrip(".")
        value = "***" if SECRET_KEY.search(key.split(".")[-1]) else redact(json.dumps(data) if isinstance(data, list) else str(data))
        out[key] = value[:5000]
    return out


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def default_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path("mlruns").resolve()
    root.mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # local store: artifacts beside the database
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def child_run(client, experiment: str, parent: str, keys: str | list[str]):
    """The parent's child run tagged with the first of `keys` that one carries; None when none does."""
    for key in [keys] if isinstance(keys, str) else keys:
        runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`{RUN_KEY}` = '{key}'",
                                  max_results=1)
        if runs:
            return runs[0]
    return None


class RunTracker:
    """A child run for one (concept, method) run; a Sink of `run_method` on Train rank 0."""

    def __init__(self, settings: dict, spec, key: str | None = None, name: str | None = None,
                 extra_params: dict | None = None, extra_tags: dict | None = None):
        """A child of the parent run, found again by `key` (a resumed or restarted run reuses it)."""
        self.client = _client(settings["uri"])
        self.settings = settings
        self.prefix = ""
        existing = child_run(self.client, settings["experiment_id"], settings["parent_run_id"], key or run_keys(spec))
        key = key or run_keys(spec)[0]
        if existing is not None:
            self.run_id = existing.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": settings["parent_run_id"], RUN_KEY: key, "method": spec.method.name,
                    "concept": spec.concept.id, "model": redact(spec.model), "code_version": code_version(),
                    "config_hash": spec.config_hash(), **(extra_tags or {})}
            run = self.client.create_run(settings["experiment_id"], tags=tags,
                                         run_name=name or f"{spec.concept.id} / {spec.method.name}")
            self.run_id = run.info.run_id
            params = flatten(spec.model_dump(mode="json", exclude={"output_dir", "prior_cache_dir", "latent_cache_dir"}))
            self._log_params({**params, **flatten(extra_params or {})})
        self.buffer: list = []

    @classmethod
    def for_worker(cls, settings: dict, spec) -> RunTracker | None:
        from personalize.distributed import is_main

        return cls(settings, spec) if is_main() else None

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.buffer += [Metric(self.prefix + k, float(v), stamp, step) for k, v in metrics.items()]
        if len(self.buffer) >= self.settings.get("log_every", 10) * max(1, len(metrics)):
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 1000])
        self.buffer = []

    def stage_finished(self, index: int, stage, checkpoint: Path, seconds: float) -> None:
        self.log_metrics({f"stage_seconds/{stage.name}": seconds}, index)
        self.flush()

    def validated(self, step: int, metrics: dict[str, float], grid: Path | None) -> None:
        """`val/*` over steps, and the point's sample grid as an artifact as soon as it exists."""
        self.log_metrics(metrics, step)
        self.flush()
        if grid is not None:
            self.client.log_artifact(self.run_id, str(grid), "validation")

    def finish(self, run_dir: Path, status: str, reason: str = "") -> None:
        self.flush()
        for pattern, folder in (("*.safetensors", "learned"), (RESOLVED_CONFIG, "config"), ("losses.csv", "logs"),
                                ("validation.csv", "logs"),
                                ("samples.png", "samples"), ("placeholders.json", "learned")):
            for path in Path(run_dir).glob(pattern):
                if path.name != "instance_latents.safetensors":
                    self.client.log_artifact(self.run_id, str(path), folder)
        for sub in ("attention", "samples"):
            if (Path(run_dir) / sub).is_dir():
                self.client.log_artifacts(self.run_id, str(Path(run_dir) / sub), sub)
        if reason:
            self.client.set_tag(self.run_id, "failure_reason", redact(reason)[:5000])
        self.client.set_terminated(self.run_id, status=status)


def run_keys(spec) -> list[str]:
    """The keys a run's MLflow run is found by: today's first, then the one runs tracked before the config hash
    left folder locations out carry."""
    return [f"{spec.concept.id}/{spec.method.name}/{h}" for h in spec.config_hashes()]


class BatchTracker:
    """The driver's side: the experiment, the parent run, evaluation results, models and aliases."""

    def __init__(self, spec: TrackingSpec, name: str, batch_params: dict, batch_key: str, kind: str = "batch"):
        self.spec = spec
        self.name = spec.experiment or name
        self.uri = spec.uri or default_uri()
        self.client = _client(self.uri)
        self.experiment = experiment_id(self.client, self.name, self.uri)
        existing = self.client.search_runs([self.experiment], filter_string=f"tags.`{BATCH_KEY}` = '{batch_key}'", max_results=1)
        if existing:
            self.parent = existing[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment, run_name=name,
                                         tags={BATCH_KEY: batch_key, "kind": kind, "code_version": code_version()})
            self.parent = run.info.run_id
            params = flatten(batch_params)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.parent, params=items[i : i + 100])
        log.info("tracking in MLflow at %s: experiment %s, parent run %s", redact(self.uri), self.experiment, self.parent)

    def worker_settings(self) -> dict:
        return {"uri": self.uri, "experiment_id": self.experiment, "parent_run_id": self.parent, "log_every": self.spec.log_every}

    def child(self, spec):
        return child_run(self.client, self.experiment, self.parent, run_keys(spec))

    def batch_finished(self, frame, evaluations: dict, paths: dict, specs: list, logs: Path | None = None) -> None:
        by_dir = {str(s.run_dir): s for s in specs}
        best: dict[str, tuple[float, str, str]] = {}
        for row in frame.itertuples():
            spec = by_dir.get(row.run_dir)
            if spec is None:  # a bad manifest row: no run was ever resolved; the results table says why
                continue
            run = self.child(spec)
            if run is None:  # never started (bad input found while preparing): record it as a failed run
                RunTracker(self.worker_settings(), spec).finish(spec.run_dir, "FAILED", row.reason)
                continue
            if row.status == "failed":
                if run.info.status != "FAILED":
                    self.client.set_tag(run.info.run_id, "failure_reason", redact(row.reason)[:5000])
                    self.client.set_terminated(run.info.run_id, status="FAILED")
                continue
            evaluation = evaluations.get(row.run_dir)
            if evaluation is not None:
                self._log_evaluation(run.info.run_id, evaluation)
            if self.spec.register_models:
                version = self._register(run, spec)
                value = (evaluation.metrics.get(self.spec.best_metric.removeprefix("eval/")) if evaluation else None)
                if version and value is not None and value == value:  # not NaN
                    name = registered_name(self.name, spec.concept.id)
                    if spec.concept.id not in best or value > best[spec.concept.id][0]:
                        best[spec.concept.id] = (value, name, version)
        for value, name, version in best.values():
            self.client.set_registered_model_alias(name, self.spec.alias, version)
            log.info("MLflow model %s: version %s (best %s %.4f) is %r", name, version, self.spec.best_metric, value,
                     self.spec.alias)
        for path in paths.values():
            self.client.log_artifact(self.parent, str(path), "results")
        comparison = Path(next(iter(paths.values()))).parent / "comparison"
        if comparison.is_dir():
            self.client.log_artifacts(self.parent, str(comparison), "comparison")
        if logs is not None:
            self.client.log_artifacts(self.parent, str(logs), "logs")
        self.client.set_terminated(self.parent, status="FINISHED")

    def _log_evaluation(self, run_id: str, evaluation) -> None:
        from mlflow.entities import Metric

        m, stamp = evaluation.metrics, int(time.time() * 1000)
        keys = ("clip_t", "clip_i", "dino", "clip_i_floor", "clip_i_ceiling", "clip_i_norm", "dino_floor", "dino_ceiling", "dino_norm")
        metrics = [Metric(f"eval/{k}", float(m[k]), stamp, 0) for k in keys if k in m and m[k] == m[k]]
        self.client.log_batch(run_id, metrics=metrics)
        self.client.set_tag(run_id, "eval.scale", m["scale"])
        for name in ("scores.csv", "metrics.json", "report.html", "overview.png"):
            self.client.log_artifact(run_id, str(evaluation.folder / name), "evaluation")

    def _register(self, run, spec) -> str | None:
        """A pyfunc model (base model reference + learned state) registered once per run; returns its version."""
        if run.data.tags.get("registered_version"):
            return run.data.tags["registered_version"]
        import mlflow

        from pipelines.registry import log_personalized_model

        mlflow.set_tracking_uri(self.uri)
        name = registered_name(self.name, spec.concept.id)
        version = log_personalized_model(run.info.run_id, spec.run_dir, name)
        self.client.set_tag(run.info.run_id, "registered_version", version)
        return version

    def fail(self, reason: str) -> None:
        self.client.set_tag(self.parent, "failure_reason", redact(reason)[:5000])
        self.client.set_terminated(self.parent, status="FAILED")


def registered_name(experiment: str, concept: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{experiment}.{concept}")


@contextmanager
def tracker_for(config):
    """The batch's tracker (None when tracking is off); the parent run ends FAILED if the batch crashes."""
    spec: TrackingSpec = config.tracking
    if not spec.enabled:
        yield None
        return
    import hashlib

    params = config.model_dump(mode="json", exclude={"tracking"})
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    tracker = BatchTracker(spec, config.name, params, key)
    try:
        yield tracker
    except BaseException as e:
        tracker.fail(f"{type(e).__name__}: {e}")
        raise
