"""Evaluate finished runs with Ray Data: (run x prompt x seed) rows -> sampling actors that load each
personalised pipeline once (one block per run) -> scoring actors (CLIP, DINO loaded once) -> per-run metrics.

Images hand off through files in each run's evaluation folder; the aggregates and reports are written by
`personalize.evaluation.write_evaluation`, the same code as `personalize evaluate`."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import ray
from PIL import Image

from personalize.config import EvaluationSpec, RunSpec
from personalize.evaluation import (
    EvalRow,
    RunEvaluation,
    Scorers,
    eval_rows,
    finished_evaluation,
    protocol,
    read_spec,
    write_evaluation,
)

log = logging.getLogger(__name__)


class SampleRun:
    """Actor: for each run in the batch, load its pipeline once and generate all of its rows."""

    def __init__(self, settings: str, device: str = "auto"):
        self.settings = EvaluationSpec.model_validate_json(settings)
        self.device = device

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from personalize.evaluation import RunSampler

        out = []
        for run_dir in batch["run_dir"]:
            sampler = RunSampler(run_dir, self.device)
            run = sampler.run
            rows = eval_rows(run.spec, run.subject, run.placeholders.strings, self.settings)
            images = sampler.generate(rows, protocol(run.spec, self.settings), self.settings.batch_size)
            staging = Path(run_dir) / "eval" / "staging"
            staging.mkdir(parents=True, exist_ok=True)
            for row, image in zip(rows, images):
                path = staging / f"p{row.prompt_index:02d}-s{row.seed}.png"
                image.save(path)
                out.append({"run_dir": run_dir, "row": json.dumps(asdict(row)), "path": str(path)})
            del sampler
        return pd.DataFrame(out)


class ScoreImages:
    """Actor: CLIP and DINO loaded once; scores image rows against their concept's real images."""

    def __init__(self, settings: str, device: str = "cpu"):
        self.settings = EvaluationSpec.model_validate_json(settings)
        self.scorers = Scorers(self.settings.clip, self.settings.dino, device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        scored = []
        for run_dir, group in batch.groupby("run_dir", sort=False):
            spec = read_spec(run_dir)
            rows = [EvalRow(**json.loads(r)) for r in group["row"]]
            images = [Image.open(p).convert("RGB") for p in group["path"]]
            for s, path in zip(self.scorers.score(images, rows, self.scorers.reference(spec)), group["path"]):
                scored.append({"run_dir": run_dir, "scored": json.dumps(s), "path": path})
        return pd.DataFrame(scored)


def evaluate_runs(specs: list[RunSpec], settings: EvaluationSpec, actors: int, use_gpu: bool) -> dict[str, RunEvaluation]:
    """Run dir -> evaluation for every given finished run (finished evaluations are reused)."""
    results, todo = {}, []
    for spec in specs:
        done = finished_evaluation(spec.run_dir, spec, settings)
        if done is not None:
            results[str(spec.run_dir)] = done
        else:
            todo.append(str(spec.run_dir))
    if not todo:
        return results
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    device = "cuda" if use_gpu else "cpu"
    ds = ray.data.from_items([{"run_dir": r} for r in todo]).repartition(len(todo))
    sampled = ds.map_batches(SampleRun, fn_constructor_kwargs={"settings": settings.model_dump_json(), "device": device},
                             batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors), **resources)
    scored = sampled.map_batches(ScoreImages, fn_constructor_kwargs={"settings": settings.model_dump_json(), "device": device},
                                 batch_size=64, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1), **resources)
    by_run: dict[str, list[tuple[dict, str]]] = {}
    for row in scored.take_all():
        by_run.setdefault(row["run_dir"], []).append((json.loads(row["scored"]), row["path"]))
    for run_dir, items in by_run.items():
        items.sort(key=lambda x: (x[0]["prompt_index"], x[0]["seed"]))
        spec = read_spec(run_dir)
        images = [Image.open(p).convert("RGB") for _, p in items]
        results[run_dir] = write_evaluation(Path(run_dir), spec, settings, [s for s, _ in items], images)
        for _, p in items:
            Path(p).unlink(missing_ok=True)
    return results
