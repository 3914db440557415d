"""Evaluation of finished runs: (prompt x seed) samples, CLIP-T / CLIP-I / DINO per image, run aggregates.

The pieces are separable so a cluster can run them on different workers: `eval_rows` (what to generate),
`RunSampler` (one personalised pipeline, loaded once), `Scorers` (encoders, loaded once) and `aggregate`.
All scores are raw cosines.

Identity is also read between a floor and a ceiling (personalize.identity): the floor is sampled here, the base
model asked for the class phrase in place of the subject on the evaluation's prompts, seeds and sampler, once per
concept and shared by every method (under <output_dir>/<concept>/_floor/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from personalize.fingerprint import references_fingerprint
from personalize.identity import (
    IDENTITY_SCORES,
    IdentityBounds,
    has_identity_bounds,
    identity_metrics,
)
from personalize.images import load_concept_images
from personalize.run_settings import EvaluationSpec, RunSpec
from personalize.sampling import LoadedRun, generate, image_grid
from personalize.scoring import (
    EvalRow,
    Scorers,
    aggregate,
    class_phrase,
    eval_rows,
    prompt_set_for,
    protocol,
    scorers_on,
)

log = logging.getLogger(__name__)

FLOOR_FOLDER = "_floor"
FLOOR_FILE = "floor.json"


def settings_key(settings: EvaluationSpec, sampling: dict, exclude: frozenset[str] = frozenset()) -> str:
    """Names an evaluation by what changes its samples and scores; `floor_ceiling` does not (an evaluation made
    without the bounds gains them later without resampling, see `evaluate_run`)."""
    payload = json.dumps({**settings.model_dump(mode="json", exclude=exclude | {"floor_ceiling"}), **sampling}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


class RunSampler:
    """One finished run's personalised pipeline, loaded once, generating rows in batches."""

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        self.run = LoadedRun(run_dir, device=device)

    def generate(self, rows: list[EvalRow], sampling: dict, batch_size: int, progress: bool = False,
                 tto: bool = False) -> list[Image.Image]:
        """Images in the rows' order. With `tto`, the placeholder is first optimised for each prompt (CoRe's test-time
        optimisation, from the trained embedding every time) and that prompt's rows are sampled with it."""
        pipe = self.run.pipeline(sampling["scheduler"])

        def sample(part: list[EvalRow]) -> list[Image.Image]:
            return generate(pipe, [r.prompt for r in part], [r.seed for r in part], self.run.spec.resolution,
                            sampling["steps"], sampling["guidance_scale"], batch_size, sampling["eta"], progress)

        if not tto:
            return sample(rows)
        from personalize.tokens import restore_joined_rows
        from personalize.tto import optimize_for_prompt

        images = []
        for template in dict.fromkeys(r.template for r in rows):
            optimize_for_prompt(self.run, template, progress=False)
            images += sample([r for r in rows if r.template == template])
        restore_joined_rows(self.run.components, self.run.trained_rows)
        return images


def floor_folder(run_dir: Path, spec: RunSpec, settings: EvaluationSpec) -> Path:
    """<output_dir>/<concept>/_floor/<prompt set>-<settings key>-<base key>: shared by every method of the concept
    whose evaluation samples alike; the base key names the base model, resolution and concept (its class phrase),
    which the floor also depends on, and not where the photos or a local model sit (floor.json records the
    references it was scored against). A floor written when the key named those folders is still found."""
    sampling = protocol(spec, settings)
    key = settings_key(settings, sampling, exclude=frozenset({"tto"}))  # the base model has no placeholder to tune
    parent = Path(run_dir).parent / FLOOR_FOLDER
    name = f"{settings.prompts}-{key}-"
    folder, legacy = parent / (name + base_key(spec, located=False)), parent / (name + base_key(spec, located=True))
    return legacy if legacy.is_dir() and not folder.is_dir() else folder


def base_key(spec: RunSpec, located: bool) -> str:
    concept = spec.concept.model_dump(mode="json", exclude={"holdout"} if located else {"holdout", "images", "masks"})
    base = {"model": spec.model, "model_fingerprint": spec.model_fingerprint, "resolution": spec.resolution, "concept": concept}
    if not located and spec.model_fingerprint is not None:
        del base["model"]
    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:8]


def sample_base_model(spec: RunSpec, rows: list[EvalRow], sampling: dict, batch_size: int, device: torch.device,
                      progress: bool = False) -> list[Image.Image]:
    """The base model with no personalisation, on the rows' prompts and seeds with the evaluation's sampler."""
    from personalize.models import load_components
    from personalize.sampling import build_pipeline

    components = load_components(spec.model)
    for module in (components.vae, *components.models.values()):
        module.to(device).eval()
    return generate(build_pipeline(components, sampling["scheduler"]), [r.prompt for r in rows], [r.seed for r in rows],
                    spec.resolution, sampling["steps"], sampling["guidance_scale"], batch_size, sampling["eta"], progress)


def write_floor(folder: Path, floor: dict, scored: list[dict], images: list[Image.Image], columns: int,
                replace: bool = False) -> None:
    """Images, a grid (one row per prompt), per-image scores and floor.json, written to a temporary folder
    renamed into place; when another process put a floor there first, that one is kept (`replace`: it gives way,
    a floor scored against references since changed)."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for row, image in zip(scored, images):
        row["image"] = f"images/p{row['prompt_index']:02d}-s{row['seed']}.png"
        image.save(tmp / row["image"])
    image_grid(images, columns).save(tmp / "grid.png")
    (tmp / "scores.json").write_text(json.dumps(scored, indent=1))
    (tmp / FLOOR_FILE).write_text(json.dumps(floor, indent=1))
    if replace:
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        shutil.rmtree(old)
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def class_floor(run_dir: Path, spec: RunSpec, settings: EvaluationSpec, scorers: Scorers, device: torch.device,
                progress: bool = False) -> tuple[dict, Path]:
    """The identity floor of the run's concept (its aggregates as `aggregate` gives them) and its folder: read if
    an earlier evaluation of the concept wrote it, else sampled from the base model with the class phrase in place
    of the subject and scored against the same references with the same exclusions."""
    folder = floor_folder(run_dir, spec, settings)
    if (folder / FLOOR_FILE).is_file():
        floor = json.loads((folder / FLOOR_FILE).read_text())
        if references_changed(floor, spec.concept):
            rescore_floor(folder, floor, spec, settings, scorers)
    else:
        phrase = class_phrase(spec.concept)
        rows = eval_rows(spec, phrase, [], settings)
        sampling = protocol(spec, settings)
        images = sample_base_model(spec, rows, sampling, settings.batch_size, device, progress)
        scored = scorers.score(images, rows, scorers.reference(spec))
        floor = {**aggregate(scored, settings.exclude_tags), "concept": spec.concept.id, "subject": phrase,
                 "model": spec.model, "resolution": spec.resolution,
                 "prompt_set": prompt_set_for(settings.prompts, spec.concept.kind), "samples": settings.samples,
                 "exclude_tags": settings.exclude_tags, "clip_model": settings.clip, "dino_model": settings.dino,
                 "references": references_fingerprint(spec.concept), **sampling}
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_floor(folder, floor, scored, images, settings.samples)
    return json.loads((folder / FLOOR_FILE).read_text()), folder


def references_changed(recorded: dict, concept) -> bool:
    """Whether an evaluation's or floor's identity scores were taken against other references than the concept's
    photos, masks and held-out photos hold now (those recorded before references were, or whose photos cannot be
    read now, stand as they are)."""
    current = references_fingerprint(concept)
    return recorded.get("references") not in (None, current) and current is not None


def stored_images(folder: Path, scored: list[dict]) -> list[Image.Image]:
    return [Image.open(folder / row["image"]).convert("RGB") for row in scored]


def rescore_floor(folder: Path, floor: dict, spec: RunSpec, settings: EvaluationSpec, scorers: Scorers) -> None:
    """A floor's stored images scored again against the concept's references as they are now: not sampled again."""
    scored = json.loads((folder / "scores.json").read_text())
    images = stored_images(folder, scored)
    scored = scorers.rescored(scored, images, scorers.reference(spec))
    floor = {**floor, **aggregate(scored, settings.exclude_tags), "references": references_fingerprint(spec.concept)}
    write_floor(folder, floor, scored, images, settings.samples, replace=True)


def identity_bounds(run_dir: Path, spec: RunSpec, settings: EvaluationSpec, scorers: Scorers, device: torch.device,
                    progress: bool = False) -> IdentityBounds:
    floor, folder = class_floor(run_dir, spec, settings, scorers, device, progress)
    ceiling, source = scorers.ceiling(spec)
    return IdentityBounds({key: floor[key] for key in IDENTITY_SCORES}, ceiling, folder, floor["subject"], source)


@dataclass
class RunEvaluation:
    run_dir: Path
    folder: Path
    metrics: dict
    scored: list[dict]


def read_spec(run_dir: str | Path) -> RunSpec:
    from personalize.run_folder import finished_spec

    return finished_spec(run_dir)


def evaluation_folder(run_dir: Path, spec: RunSpec, settings: EvaluationSpec) -> Path:
    return Path(run_dir) / "eval" / f"{settings.prompts}-{settings_key(settings, protocol(spec, settings))}"


def finished_evaluation(run_dir: Path, spec: RunSpec, settings: EvaluationSpec) -> RunEvaluation | None:
    folder = evaluation_folder(run_dir, spec, settings)
    if not (folder / "metrics.json").is_file():
        return None
    return RunEvaluation(Path(run_dir), folder, json.loads((folder / "metrics.json").read_text()),
                         json.loads((folder / "scores.json").read_text()))


def write_evaluation(run_dir: Path, spec: RunSpec, settings: EvaluationSpec, scored: list[dict],
                     images: list[Image.Image], bounds: IdentityBounds | None = None) -> RunEvaluation:
    """Images, scores, aggregates and the report, written to a temporary folder renamed into place. Without
    `bounds` the floor, ceiling and normalised scores are NaN, with the reason among the warnings."""
    from personalize.report import write_run_report

    folder = evaluation_folder(run_dir, spec, settings)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for row, image in zip(scored, images):
        row["image"] = f"images/p{row['prompt_index']:02d}-s{row['seed']}.png"
        image.save(tmp / row["image"])
    raw = aggregate(scored, settings.exclude_tags)
    missing = ("identity floor and ceiling switched off (floor_ceiling: false)" if not settings.floor_ceiling else
               "identity floor and ceiling not computed by this evaluation path; `personalize evaluate` on the run adds "
               "them without resampling it")
    metrics = {
        **raw, **identity_metrics(raw, bounds, missing),
        "run": str(run_dir), "concept": spec.concept.id, "method": spec.method.name,
        "prompt_set": prompt_set_for(settings.prompts, spec.concept.kind), "samples": settings.samples,
        "text_mode": settings.text_mode, "exclude_tags": settings.exclude_tags, "clip_model": settings.clip,
        "dino_model": settings.dino, "references": references_fingerprint(spec.concept), **protocol(spec, settings),
    }
    references = load_concept_images(spec.concept.id, spec.concept.images, resolution=0)
    write_run_report(tmp, Path(run_dir), metrics, scored, images, references)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return RunEvaluation(Path(run_dir), folder, metrics, scored)


def evaluate_run(run_dir: str | Path, settings: EvaluationSpec, scorers: Scorers | None = None, device: str = "auto",
                 progress: bool = True) -> RunEvaluation:
    """Generate, score and write one run's evaluation under RUN/eval/<prompt set>-<settings key>/ (reused if
    there), with the identity floor and ceiling unless `settings.floor_ceiling` is off. A finished evaluation that
    lacks them gains them, its samples kept."""
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    done = finished_evaluation(run_dir, spec, settings)
    if done is not None and references_changed(done.metrics, spec.concept):
        return rescore_identity(done, spec, settings, scorers, device, progress)
    if done is not None and (has_identity_bounds(done.metrics, spec.concept) or not settings.floor_ceiling):
        return done
    if done is not None:
        return add_identity_bounds(done, spec, settings, scorers, device, progress)
    sampler = RunSampler(run_dir, device)
    run = sampler.run
    rows = eval_rows(spec, run.subject, run.placeholders.strings, settings)
    images = sampler.generate(rows, protocol(spec, settings), settings.batch_size, progress, settings.tto)
    torch_device = run.device
    del sampler, run  # the personalised pipeline leaves memory before the base model is loaded for the floor
    scorers = scorers or scorers_on(settings, torch_device)
    scored = scorers.score(images, rows, scorers.reference(spec))
    bounds = identity_bounds(run_dir, spec, settings, scorers, torch_device, progress) if settings.floor_ceiling else None
    return write_evaluation(run_dir, spec, settings, scored, images, bounds)


def add_identity_bounds(done: RunEvaluation, spec: RunSpec, settings: EvaluationSpec, scorers: Scorers | None,
                        device: str, progress: bool) -> RunEvaluation:
    """A finished evaluation rewritten with the identity floor and ceiling, from its stored images and scores."""
    return _rewritten(done, spec, settings, scorers, device, progress, rescore=False)


def rescore_identity(done: RunEvaluation, spec: RunSpec, settings: EvaluationSpec, scorers: Scorers | None,
                     device: str, progress: bool) -> RunEvaluation:
    """A finished evaluation whose concept's photos, masks or held-out photos changed, its identity scores (and
    bounds) taken again against them from its stored images: nothing is sampled again."""
    log.info("%s: the concept's references changed since its evaluation; scoring its stored samples again", done.run_dir)
    return _rewritten(done, spec, settings, scorers, device, progress, rescore=True)


def _rewritten(done: RunEvaluation, spec: RunSpec, settings: EvaluationSpec, scorers: Scorers | None, device: str,
               progress: bool, rescore: bool) -> RunEvaluation:
    from personalize.devices import resolve_device

    torch_device = resolve_device(device)
    scorers = scorers or scorers_on(settings, torch_device)
    images = stored_images(done.folder, done.scored)
    scored = scorers.rescored(done.scored, images, scorers.reference(spec)) if rescore else done.scored
    bounds = identity_bounds(done.run_dir, spec, settings, scorers, torch_device, progress) if settings.floor_ceiling else None
    return write_evaluation(done.run_dir, spec, settings, scored, images, bounds)


