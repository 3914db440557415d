"""Evaluate finished runs with Ray Data: one row per run -> evaluation actors (CLIP and DINO loaded once each) that
load the run's personalised pipeline, sample its (prompt x seed) rows and score them -> per-run metrics.

The scored images come back inside the rows (PNG bytes), so the actors may sit on any node: an actor pulls its
run folder from an s3 storage root first. The aggregates and reports are written by
`personalize.evaluation.write_evaluation` on the driver, the same code as `personalize evaluate`."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pandas as pd
import ray
from PIL import Image

from personalize.devices import resolve_device
from personalize.evaluation import (
    RunEvaluation,
    add_identity_bounds,
    finished_evaluation,
    read_spec,
    references_changed,
    rescore_identity,
    write_evaluation,
)
from personalize.identity import has_identity_bounds
from personalize.run_settings import EvaluationSpec, RunSpec
from personalize.scoring import Scorers, eval_rows, protocol, scorers_on

log = logging.getLogger(__name__)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def from_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class EvaluateRuns:
    """Actor: CLIP and DINO loaded once; for each run it is handed, loads the run's pipeline, generates all of its rows
    and scores them against the concept's real images. Sampling and scoring share the actor's process and device:
    one model load and one set of imports per actor, and no image crosses the object store before it is scored."""

    def __init__(self, settings: str, storage: str | None = None, device: str = "auto"):
        self.settings = EvaluationSpec.model_validate_json(settings)
        self.storage = storage
        self.device = device
        self.scorers = Scorers(self.settings.clip, self.settings.dino, str(resolve_device(device)))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for run_dir in batch["run_dir"]:
            images, scores = self.evaluate(run_dir)
            for score, image in zip(scores, images):
                out.append({"run_dir": run_dir, "scored": json.dumps(score), "image": png_bytes(image)})
        return pd.DataFrame(out)

    def evaluate(self, run_dir: str):
        from personalize.evaluation import RunSampler
        from personalize.run_folder import DONE
        from pipelines.storage import StorageRoot

        if self.storage is not None:  # this node may not have the run folder yet (a local root pulls nothing)
            root = StorageRoot(self.storage)
            root.pull(root.relative(Path(run_dir)), marker=DONE)
        sampler = RunSampler(run_dir, self.device)
        run = sampler.run
        rows = eval_rows(run.spec, run.subject, run.placeholders.strings, self.settings)
        images = sampler.generate(rows, protocol(run.spec, self.settings), self.settings.batch_size, tto=self.settings.tto)
        del sampler  # the run's pipeline, before the next run's is loaded
        return images, self.scorers.score(images, rows, self.scorers.reference(run.spec))


def evaluate_runs(specs: list[RunSpec], settings: EvaluationSpec, actors: int, use_gpu: bool,
                  storage: str | None = None) -> dict[str, RunEvaluation]:
    """Run dir -> evaluation for every given finished run (finished evaluations are reused). With an s3
    `storage` root, the evaluation actors pull the run folders they evaluate. The identity floor and ceiling are
    added in the driver (`add_bounds`)."""
    results, todo = {}, []
    for spec in specs:
        done = finished_evaluation(spec.run_dir, spec, settings)
        if done is not None:
            results[str(spec.run_dir)] = done
        else:
            todo.append(str(spec.run_dir))
    if todo:
        results.update(sample_and_score(todo, settings, actors, use_gpu, storage))
    return add_bounds(results, settings)


def sample_and_score(todo: list[str], settings: EvaluationSpec, actors: int, use_gpu: bool,
                     storage: str | None) -> dict[str, RunEvaluation]:
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    device = "cuda" if use_gpu else "cpu"
    ds = ray.data.from_items([{"run_dir": r} for r in todo]).repartition(len(todo))
    scored = ds.map_batches(EvaluateRuns, fn_constructor_kwargs={"settings": settings.model_dump_json(), "storage": storage,
                                                                 "device": device},
                            batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors), **resources)
    by_run: dict[str, list[tuple[dict, bytes]]] = {}
    for row in scored.take_all():
        by_run.setdefault(row["run_dir"], []).append((json.loads(row["scored"]), row["image"]))
    results = {}
    for run_dir, items in by_run.items():
        items.sort(key=lambda x: (x[0]["prompt_index"], x[0]["seed"]))
        spec = read_spec(run_dir)
        results[run_dir] = write_evaluation(Path(run_dir), spec, settings, [s for s, _ in items], [from_png(b) for _, b in items])
    return results


def add_bounds(results: dict[str, RunEvaluation], settings: EvaluationSpec) -> dict[str, RunEvaluation]:
    """Each evaluation that lacks them gains the identity floor and ceiling: sampled here in the driver (on its GPU if
    it has one), once per concept (every method of a concept shares its floor), from the stored images (nothing is
    sampled again). A run whose bounds fail keeps its evaluation without them, the reason logged. An evaluation
    whose concept's photos, masks or held-out photos changed since is scored again from its stored images."""
    specs = {run: read_spec(run) for run in results}
    stale = {run for run, done in results.items() if references_changed(done.metrics, specs[run].concept)}
    missing = {run for run, done in results.items()
               if settings.floor_ceiling and not has_identity_bounds(done.metrics, specs[run].concept)}
    if not stale | missing:
        return results
    device = resolve_device("auto")
    scorers = scorers_on(settings, device)
    for run_dir in sorted(stale):
        try:
            results[run_dir] = rescore_identity(results[run_dir], specs[run_dir], settings, scorers, str(device), progress=False)
        except Exception as e:
            log.error("%s: its concept's references changed, but scoring it again failed (its earlier scores are "
                      "kept): %s", run_dir, e)
    for run_dir in sorted(missing - stale):
        try:
            results[run_dir] = add_identity_bounds(results[run_dir], specs[run_dir], settings, scorers, str(device), progress=False)
        except Exception as e:  # an optional enrichment: the scored samples stand without it
            log.error("identity floor and ceiling of %s not computed: %s", run_dir, e)
    return results
