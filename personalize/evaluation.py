"""Evaluation of finished runs: (prompt x seed) samples, CLIP-T / CLIP-I / DINO per image, run aggregates.

The pieces are separable so a cluster can run them on different workers: `eval_rows` (what to generate),
`RunSampler` (one personalised pipeline, loaded once), `Scorers` (encoders, loaded once) and `aggregate`.
All scores are raw cosines.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from personalize.config import EvaluationSpec, RunSpec
from personalize.images import load_concept_images, load_masks
from personalize.metrics import SCALE, ClipScorer, DinoScorer, apply_mask, per_row_mean
from personalize.prompts import load_prompt_set
from personalize.sampling import LoadedRun, generate


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


def eval_rows(spec: RunSpec, subject: str, placeholder_strings: list[str], settings: EvaluationSpec) -> list[EvalRow]:
    items = load_prompt_set(prompt_set_for(settings.prompts, spec.concept.kind))
    class_phrase = " and ".join(s.super_category for s in spec.concept.subjects)
    rows = []
    for index, item in enumerate(items):
        text = clip_text(item.template, subject, placeholder_strings, class_phrase, settings.text_mode)
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


def settings_key(settings: EvaluationSpec, sampling: dict) -> str:
    payload = json.dumps({**settings.model_dump(mode="json"), **sampling}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


class RunSampler:
    """One finished run's personalised pipeline, loaded once, generating rows in batches."""

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        self.run = LoadedRun(run_dir, device=device)

    def generate(self, rows: list[EvalRow], sampling: dict, batch_size: int, progress: bool = False) -> list[Image.Image]:
        pipe = self.run.pipeline(sampling["scheduler"])
        return generate(pipe, [r.prompt for r in rows], [r.seed for r in rows], self.run.spec.resolution,
                        sampling["steps"], sampling["guidance_scale"], batch_size, sampling["eta"], progress)


class Scorers:
    """CLIP and DINO encoders, loaded once; real-image features cached per concept."""

    def __init__(self, clip: str, dino: str, device: str = "cpu"):
        self.clip = ClipScorer(clip, device)
        self.dino = DinoScorer(dino, device)
        self._reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reference(self, spec: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP and DINO features of the concept's real images (foreground-masked when the concept has masks)."""
        concept = spec.concept
        if concept.id not in self._reference:
            images = load_concept_images(concept.id, concept.images, resolution=0)
            if concept.masks:
                from personalize.images import list_image_files

                names = [p.name for p in list_image_files(concept.id, concept.images)]
                images = [apply_mask(im, m) for im, m in zip(images, load_masks(concept.id, concept.masks, names))]
            self._reference[concept.id] = (self.clip.image_features(images), self.dino.image_features(images))
        return self._reference[concept.id]

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


@dataclass
class RunEvaluation:
    run_dir: Path
    folder: Path
    metrics: dict
    scored: list[dict]


def read_spec(run_dir: str | Path) -> RunSpec:
    path = Path(run_dir) / "config.resolved.json"
    if not (Path(run_dir) / "DONE.json").is_file() or not path.is_file():
        from personalize.errors import RunStateError

        raise RunStateError(f"{run_dir} is not a finished run (no DONE.json); train it first or pass a run folder")
    return RunSpec.model_validate_json(path.read_text())


def evaluation_folder(run_dir: Path, spec: RunSpec, settings: EvaluationSpec) -> Path:
    return Path(run_dir) / "eval" / f"{settings.prompts}-{settings_key(settings, protocol(spec, settings))}"


def finished_evaluation(run_dir: Path, spec: RunSpec, settings: EvaluationSpec) -> RunEvaluation | None:
    folder = evaluation_folder(run_dir, spec, settings)
    if not (folder / "metrics.json").is_file():
        return None
    return RunEvaluation(Path(run_dir), folder, json.loads((folder / "metrics.json").read_text()),
                         json.loads((folder / "scores.json").read_text()))


def write_evaluation(run_dir: Path, spec: RunSpec, settings: EvaluationSpec, scored: list[dict],
                     images: list[Image.Image]) -> RunEvaluation:
    """Images, scores, aggregates and the report, written to a temporary folder renamed into place."""
    import shutil

    from personalize.report import write_run_report

    folder = evaluation_folder(run_dir, spec, settings)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    for row, image in zip(scored, images):
        row["image"] = f"images/p{row['prompt_index']:02d}-s{row['seed']}.png"
        image.save(tmp / row["image"])
    metrics = {
        **aggregate(scored, settings.exclude_tags),
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


def evaluate_run(run_dir: str | Path, settings: EvaluationSpec, scorers: Scorers | None = None, device: str = "auto",
                 progress: bool = True) -> RunEvaluation:
    """Generate, score and write one run's evaluation under RUN/eval/<prompt set>-<settings key>/ (reused if there)."""
    done = finished_evaluation(Path(run_dir), read_spec(run_dir), settings)
    if done is not None:
        return done
    sampler = RunSampler(run_dir, device)
    run = sampler.run
    rows = eval_rows(run.spec, run.subject, run.placeholders.strings, settings)
    images = sampler.generate(rows, protocol(run.spec, settings), settings.batch_size, progress)
    scorers = scorers or Scorers(settings.clip, settings.dino, "cpu" if run.device.type == "cpu" else str(run.device))
    scored = scorers.score(images, rows, scorers.reference(run.spec))
    return write_evaluation(run.run_dir, run.spec, settings, scored, images)


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
