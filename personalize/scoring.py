"""Scoring generated images of a run: what to sample (prompt x seed rows of an evaluation prompt set), the
sampling protocol, the CLIP and DINO scorers with each concept's reference features, and the aggregates. Used by
the evaluation of finished runs (personalize/evaluation.py) and by validation while training
(personalize/validation.py), so it imports neither the training loop nor the evaluation."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from personalize.identity import IDENTITY_SCORES, ceiling_source
from personalize.images import list_image_files, load_concept_images, load_masks
from personalize.metrics import SCALE, ClipScorer, DinoScorer, apply_mask, pairwise_mean, per_row_mean
from personalize.prompts import load_prompt_set
from personalize.run_settings import ConceptSpec, EvaluationSpec, RunSpec
from personalize.sampling import build_pipeline, generate


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


def concept_key(concept: ConceptSpec) -> str:
    """A concept by its id and folders: runs of one id from two batches may hold different photos."""
    return concept.model_dump_json()


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
        concept, key = spec.concept, concept_key(spec.concept)
        if key not in self._reference:
            photos = load_concept_images(concept.id, concept.images, resolution=0)
            self._reference[key] = self.features(masked_references(concept, photos))
        return self._reference[key]

    def ceiling(self, spec: RunSpec) -> tuple[dict[str, float], str]:
        """The identity scores of real photos of the subject, scored as generated images are (whole photo against
        the references), and where they came from: the concept's held-out photos, or without them leave-one-out
        over the reference photos."""
        concept, key = spec.concept, concept_key(spec.concept)
        if key not in self._ceiling:
            reference = self.reference(spec)
            if concept.holdout:
                holdout = self.features(load_concept_images(concept.id, concept.holdout, resolution=0))
                scores = {key: pairwise_mean(holdout[i], reference[i]) for i, key in enumerate(IDENTITY_SCORES)}
            else:
                photos = load_concept_images(concept.id, concept.images, resolution=0)
                candidates = self.features(photos) if concept.masks else reference
                scores = {key: leave_one_out_mean(candidates[i], reference[i]) for i, key in enumerate(IDENTITY_SCORES)}
            self._ceiling[key] = (scores, ceiling_source(concept))
        return self._ceiling[key]

    def rescored(self, scored: list[dict], images: list[Image.Image], reference: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
        """Scored rows with their identity scores taken again against `reference` (the text score stands)."""
        clip_i = per_row_mean(self.clip.image_features(images), reference[0])
        dino = per_row_mean(self.dino.image_features(images), reference[1])
        return [{**row, "clip_i": float(i), "dino": float(d)} for row, i, d in zip(scored, clip_i, dino)]

    def score(self, images: list[Image.Image], rows: list[EvalRow], reference: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
        clip_img = self.clip.image_features(images)
        texts = sorted({r.text for r in rows})
        text_feats = dict(zip(texts, self.clip.text_features(texts)))
        clip_t = (clip_img * torch.stack([text_feats[r.text] for r in rows])).sum(-1)
        clip_i = per_row_mean(clip_img, reference[0])
        dino = per_row_mean(self.dino.image_features(images), reference[1])
        return [{**asdict(r), "clip_t": float(t), "clip_i": float(i), "dino": float(d)}
                for r, t, i, d in zip(rows, clip_t, clip_i, dino)]


def scorers_on(settings: EvaluationSpec, device: torch.device) -> Scorers:
    return Scorers(settings.clip, settings.dino, "cpu" if device.type == "cpu" else str(device))


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


def evaluate_in_training(ctx, settings: EvaluationSpec, scorers: Scorers, max_prompts: int | None = None) -> dict:
    """A cheap evaluation of a run still in memory (e.g. at a stage boundary): the first `max_prompts` prompts of
    the set, sampled with the current weights, scored, aggregated. Nothing is written."""
    return sample_and_score(ctx, settings, scorers, max_prompts)[0]


def sample_and_score(ctx, settings: EvaluationSpec, scorers: Scorers, max_prompts: int | None = None
                     ) -> tuple[dict, list[Image.Image], list[EvalRow]]:
    """`evaluate_in_training`'s aggregate, with the images it sampled and their rows."""
    rows = eval_rows(ctx.spec, ctx.subject, ctx.placeholders.strings, settings)
    if max_prompts is not None:
        rows = [r for r in rows if r.prompt_index < max_prompts]
    sampling = protocol(ctx.spec, settings)
    images = generate(build_pipeline(ctx.components, sampling["scheduler"]), [r.prompt for r in rows], [r.seed for r in rows],
                      ctx.spec.resolution, sampling["steps"], sampling["guidance_scale"], settings.batch_size, sampling["eta"])
    return aggregate(scorers.score(images, rows, scorers.reference(ctx.spec)), settings.exclude_tags), images, rows
