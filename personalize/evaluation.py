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
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from personalize.identity import (
    IDENTITY_SCORES,
    IdentityBounds,
    ceiling_source,
    has_identity_bounds,
    identity_metrics,
)
from personalize.images import list_image_files, load_concept_images, load_masks
from personalize.metrics import SCALE, ClipScorer, DinoScorer, apply_mask, pairwise_mean, per_row_mean
from personalize.prompts import load_prompt_set
from personalize.run_settings import ConceptSpec, EvaluationSpec, RunSpec
from personalize.sampling import LoadedRun, generate, image_grid

log = logging.getLogger(__name__)

FLOOR_FOLDER = "_floor"
FLOOR_FILE = "floor.json"


@dataclass
class EvalRow:
    prompt_index: int
    template: str
    tags: list[str]
    prompt: str  # what the personalised model is asked (subject named as trained)
    text: str  # what CLIP-T compares the image with
    seed: int


def prompt_set_for(name: str, kind: str) -> str:
    if name == "dreambooth":
        return "dreambooth_live" if kind == "animate" else "dreambooth_object"
    return name


def clip_text(template: str, subject: str, placeholder_strings: list[str], class_phrase: str, mode: str) -> str:
    """The CLIP-T prompt: `remove` deletes the placeholder tokens from the filled prompt (a class word the method
    puts after them stays); `replace` puts the class word where the whole subject was."""
    if mode == "replace":
        text = template.replace("{}", class_phrase)
    else:
        text = template.replace("{}", subject)
        for token in sorted(placeholder_strings, key=len, reverse=True):
            text = text.replace(token, " ")
    return re.sub(r"\s+", " ", text).strip()


def class_phrase(concept: ConceptSpec) -> str:
    """The concept's subjects by their super-categories alone ("star", "cat and dog"): the subject unpersonalised."""
    return " and ".join(s.super_category for s in concept.subjects)


def eval_rows(spec: RunSpec, subject: str, placeholder_strings: list[str], settings: EvaluationSpec) -> list[EvalRow]:
    items = load_prompt_set(prompt_set_for(settings.prompts, spec.concept.kind))
    rows = []
    for index, item in enumerate(items):
        text = clip_text(item.template, subject, placeholder_strings, class_phrase(spec.concept), settings.text_mode)
        for k in range(settings.samples):
            rows.append(EvalRow(index, item.template, sorted(item.tags), item.template.replace("{}", subject), text,
                                settings.seed + k))
    return rows


def protocol(spec: RunSpec, settings: EvaluationSpec) -> dict:
    """Sampling settings: explicit ones win, the rest follow the method's paper protocol."""
    paper = spec.method.evaluation
    return {
        "scheduler": settings.scheduler or paper.scheduler,
        "steps": settings.steps or paper.steps,
        "guidance_scale": settings.guidance_scale if settings.guidance_scale is not None else paper.guidance_scale,
        "eta": settings.eta if settings.eta is not None else paper.eta,
    }


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
        from personalize.tokens import restore_rows
        from personalize.tto import optimize_for_prompt

        images = []
        for template in dict.fromkeys(r.template for r in rows):
            optimize_for_prompt(self.run, template, progress=False)
            images += sample([r for r in rows if r.template == template])
        restore_rows(self.run.components.text_encoder, self.run.trained_rows)
        return images


def masked_references(concept: ConceptSpec, photos: list[Image.Image]) -> list[Image.Image]:
    """The concept's photos as identity scores compare against them: foreground only when the concept has masks."""
    if not concept.masks:
        return photos
    names = [p.name for p in list_image_files(concept.id, concept.images)]
    return [apply_mask(im, m) for im, m in zip(photos, load_masks(concept.id, concept.masks, names))]


def leave_one_out_mean(candidates: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over i of candidate i's mean cosine to every reference except the i-th (row i of both is one photo):
    how alike different photos of the subject are, without a photo ever meeting itself. NaN below two photos."""
    count = len(candidates)
    if count < 2 or len(references) != count:
        return float("nan")
    cosines = F.normalize(candidates.float(), dim=-1) @ F.normalize(references.float(), dim=-1).T
    return float(((cosines.sum(1) - cosines.diagonal()) / (count - 1)).mean())


class Scorers:
    """CLIP and DINO encoders, loaded once; real-image features and identity ceilings cached per concept."""

    def __init__(self, clip: str, dino: str, device: str = "cpu"):
        self.clip = ClipScorer(clip, device)
        self.dino = DinoScorer(dino, device)
        self._reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ceiling: dict[str, tuple[dict[str, float], str]] = {}

    def features(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clip.image_features(images), self.dino.image_features(images)

    def reference(self, spec: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP and DINO features of the concept's real images (foreground-masked when the concept has masks)."""
        concept = spec.concept
        if concept.id not in self._reference:
            photos = load_concept_images(concept.id, concept.images, resolution=0)
            self._reference[concept.id] = self.features(masked_references(concept, photos))
        return self._reference[concept.id]

    def ceiling(self, spec: RunSpec) -> tuple[dict[str, float], str]:
        """The identity scores of real photos of the subject, scored as generated images are (whole photo against
        the references), and where they came from: the concept's held-out photos, or without them leave-one-out
        over the reference photos."""
        concept = spec.concept
        if concept.id not in self._ceiling:
            reference = self.reference(spec)
            if concept.holdout:
                holdout = self.features(load_concept_images(concept.id, concept.holdout, resolution=0))
                scores = {key: pairwise_mean(holdout[i], reference[i]) for i, key in enumerate(IDENTITY_SCORES)}
            else:
                photos = load_concept_images(concept.id, concept.images, resolution=0)
                candidates = self.features(photos) if concept.masks else reference
                scores = {key: leave_one_out_mean(candidates[i], reference[i]) for i, key in enumerate(IDENTITY_SCORES)}
            self._ceiling[concept.id] = (scores, ceiling_source(concept))
        return self._ceiling[concept.id]

    def score(self, images: list[Image.Image], rows: list[EvalRow], reference: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
        clip_img = self.clip.image_features(images)
        texts = sorted({r.text for r in rows})
        text_feats = dict(zip(texts, self.clip.text_features(texts)))
        clip_t = (clip_img * torch.stack([text_feats[r.text] for r in rows])).sum(-1)
        clip_i = per_row_mean(clip_img, reference[0])
        dino = per_row_mean(self.dino.image_features(images), reference[1])
        return [{**asdict(r), "clip_t": float(t), "clip_i": float(i), "dino": float(d)}
                for r, t, i, d in zip(rows, clip_t, clip_i, dino)]


def aggregate(scored: list[dict], exclude_tags: list[str]) -> dict:
    """CLIP-T over every image; CLIP-I and DINO over images whose prompt carries none of `exclude_tags`
    (each is the mean over all generated x real pairs)."""
    identity = [s for s in scored if not set(s["tags"]) & set(exclude_tags)]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else float("nan")

    return {
        "clip_t": mean(scored, "clip_t"),
        "clip_i": mean(identity, "clip_i"),
        "dino": mean(identity, "dino"),
        "n_images": len(scored),
        "n_identity_images": len(identity),
        "scale": SCALE,
    }


def floor_folder(run_dir: Path, spec: RunSpec, settings: EvaluationSpec) -> Path:
    """<output_dir>/<concept>/_floor/<prompt set>-<settings key>-<base key>: shared by every method of the concept
    whose evaluation samples alike; the base key names the base model, resolution and concept (class phrase and
    reference photos), which the floor also depends on."""
    sampling = protocol(spec, settings)
    base = {"model": spec.model, "model_fingerprint": spec.model_fingerprint, "resolution": spec.resolution,
            "concept": spec.concept.model_dump(mode="json", exclude={"holdout"})}
    base_key = hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:8]
    key = settings_key(settings, sampling, exclude=frozenset({"tto"}))  # the base model has no placeholder to tune
    return Path(run_dir).parent / FLOOR_FOLDER / f"{settings.prompts}-{key}-{base_key}"


def sample_base_model(spec: RunSpec, rows: list[EvalRow], sampling: dict, batch_size: int, device: torch.device,
                      progress: bool = False) -> list[Image.Image]:
    """The base model with no personalisation, on the rows' prompts and seeds with the evaluation's sampler."""
    from personalize.models import load_components
    from personalize.sampling import build_pipeline

    components = load_components(spec.model)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device).eval()
    return generate(build_pipeline(components, sampling["scheduler"]), [r.prompt for r in rows], [r.seed for r in rows],
                    spec.resolution, sampling["steps"], sampling["guidance_scale"], batch_size, sampling["eta"], progress)


def write_floor(folder: Path, floor: dict, scored: list[dict], images: list[Image.Image], columns: int) -> None:
    """Images, a grid (one row per prompt), per-image scores and floor.json, written to a temporary folder
    renamed into place; when another process put a floor there first, that one is kept."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for row, image in zip(scored, images):
        row["image"] = f"images/p{row['prompt_index']:02d}-s{row['seed']}.png"
        image.save(tmp / row["image"])
    image_grid(images, columns).save(tmp / "grid.png")
    (tmp / "scores.json").write_text(json.dumps(scored, indent=1))
    (tmp / FLOOR_FILE).write_text(json.dumps(floor, indent=1))
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
    if not (folder / FLOOR_FILE).is_file():
        phrase = class_phrase(spec.concept)
        rows = eval_rows(spec, phrase, [], settings)
        sampling = protocol(spec, settings)
        images = sample_base_model(spec, rows, sampling, settings.batch_size, device, progress)
        scored = scorers.score(images, rows, scorers.reference(spec))
        floor = {**aggregate(scored, settings.exclude_tags), "concept": spec.concept.id, "subject": phrase,
                 "model": spec.model, "resolution": spec.resolution,
                 "prompt_set": prompt_set_for(settings.prompts, spec.concept.kind), "samples": settings.samples,
                 "exclude_tags": settings.exclude_tags, "clip_model": settings.clip, "dino_model": settings.dino, **sampling}
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_floor(folder, floor, scored, images, settings.samples)
    return json.loads((folder / FLOOR_FILE).read_text()), folder


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
        "dino_model": settings.dino, **protocol(spec, settings),
    }
    references = load_concept_images(spec.concept.id, spec.concept.images, resolution=0)
    write_run_report(tmp, Path(run_dir), metrics, scored, images, references)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return RunEvaluation(Path(run_dir), folder, metrics, scored)


def scorers_on(settings: EvaluationSpec, device: torch.device) -> Scorers:
    return Scorers(settings.clip, settings.dino, "cpu" if device.type == "cpu" else str(device))


def evaluate_run(run_dir: str | Path, settings: EvaluationSpec, scorers: Scorers | None = None, device: str = "auto",
                 progress: bool = True) -> RunEvaluation:
    """Generate, score and write one run's evaluation under RUN/eval/<prompt set>-<settings key>/ (reused if
    there), with the identity floor and ceiling unless `settings.floor_ceiling` is off. A finished evaluation that
    lacks them gains them, its samples kept."""
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    done = finished_evaluation(run_dir, spec, settings)
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
    from personalize.devices import resolve_device

    torch_device = resolve_device(device)
    scorers = scorers or scorers_on(settings, torch_device)
    images = [Image.open(done.folder / row["image"]).convert("RGB") for row in done.scored]
    bounds = identity_bounds(done.run_dir, spec, settings, scorers, torch_device, progress)
    return write_evaluation(done.run_dir, spec, settings, done.scored, images, bounds)


def evaluate_in_training(ctx, settings: EvaluationSpec, scorers: Scorers, max_prompts: int | None = None) -> dict:
    """A cheap evaluation of a run still in memory (e.g. at a stage boundary): the first `max_prompts` prompts of
    the set, sampled with the current weights, scored, aggregated. Nothing is written."""
    rows = eval_rows(ctx.spec, ctx.subject, ctx.placeholders.strings, settings)
    if max_prompts is not None:
        rows = [r for r in rows if r.prompt_index < max_prompts]
    sampling = protocol(ctx.spec, settings)
    from personalize.sampling import build_pipeline

    images = generate(build_pipeline(ctx.components, sampling["scheduler"]), [r.prompt for r in rows], [r.seed for r in rows],
                      ctx.spec.resolution, sampling["steps"], sampling["guidance_scale"], settings.batch_size, sampling["eta"])
    return aggregate(scorers.score(images, rows, scorers.reference(ctx.spec)), settings.exclude_tags)
