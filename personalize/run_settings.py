"""Run settings: the concepts, the sample grid, the evaluation, and the settings every run shares, which the
experiment (one method), the batch (pipelines/config.py) and the resolved RunSpec extend."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from personalize.method_spec import HASHED_WHEN_SET, RECORD_ONLY, MethodSpec, Strict

SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


class EvaluationSpec(Strict):
    """Evaluation of finished runs. Unset sampling fields follow the method's paper protocol."""

    prompts: str = "dreambooth"  # a prompt set; "dreambooth" picks the object or live-subject list by concept kind
    samples: int = Field(default=4, ge=1)  # images per prompt (seeds seed .. seed + samples - 1)
    seed: int = 0
    scheduler: Literal["ddim", "dpm"] | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = None
    eta: float | None = None
    text_mode: Literal["remove", "replace"] = "remove"  # CLIP-T prompt: placeholder removed, or subject -> class word
    exclude_tags: list[str] = []  # prompts with these tags leave the identity metrics (CoRe: style, outfit)
    tto: bool = False  # CoRe's test-time optimisation of the placeholder for each prompt before sampling it
    clip: str = "ViT-B-32/openai"
    dino: str = "facebook/dino-vits16"
    batch_size: int = Field(default=8, ge=1)
    # identity floor (base model asked for the class) and ceiling (real photos), for the normalised CLIP-I / DINO
    floor_ceiling: bool = True


VALIDATION_SCORES = ("clip_t", "clip_i", "dino")


class ValidationSpec(EvaluationSpec):
    """Validation while training (personalize/validation.py): a cheap evaluation of the weights in memory every
    `every` steps and after the last, on the first `prompt_count` prompts of the set with `samples` seeds each.
    With `selection: best` the run exports the point that scored highest on `objective` (a weighted sum of raw
    scores); the best `keep` points' weights are kept on disk until the run ends."""

    every: int | None = Field(default=None, ge=1)  # unset: the method's protocol (validation: in its YAML)
    prompt_count: int = Field(default=4, ge=1)
    samples: int = Field(default=1, ge=1)
    floor_ceiling: bool = False
    selection: Literal["last", "best"] = "last"
    objective: dict[Literal["clip_t", "clip_i", "dino"], float] = {"clip_t": 1.0, "clip_i": 1.0}
    keep: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _usable(self) -> ValidationSpec:
        if self.tto:
            raise ValueError("validation samples the weights being trained: tto is for the final evaluation only")
        if not self.objective or not any(w > 0 for w in self.objective.values()):
            raise ValueError("validation.objective needs at least one positive weight, e.g. {clip_i: 1.0}")
        return self


class SubjectSpec(Strict):
    super_category: str = Field(min_length=1)


class ConceptSpec(Strict):
    id: str
    images: str
    super_category: str | None = None
    kind: Literal["object", "animate"] = "object"
    subjects: list[SubjectSpec] | None = None
    masks: str | None = None
    holdout: str | None = None  # photos of the subject kept out of training: the identity ceiling

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        if not SAFE_ID.match(v):
            raise ValueError(
                f"concept id {v!r} is unsafe: use only letters, digits, '-' and '_' (it names folders and runs)"
            )
        return v

    @model_validator(mode="after")
    def _subjects(self) -> ConceptSpec:
        if self.subjects is None:
            if not self.super_category:
                raise ValueError("give super_category (one subject) or subjects (several subjects in one image)")
            self.subjects = [SubjectSpec(super_category=self.super_category)]
        elif self.super_category is None:
            self.super_category = self.subjects[0].super_category
        return self


class SampleSpec(Strict):
    """The small sample grid written with every run."""

    prompts: list[str] = ["a photo of a {subject}", "a {subject} on the beach"]
    seeds: list[int] = [0, 1]
    steps: int = Field(default=25, ge=1)
    guidance_scale: float = 7.5
    scheduler: Literal["ddim", "dpm"] = "ddim"
    heatmaps: bool = True  # attention heat maps of the subject tokens after every stage
    every_stage: bool = True  # also a grid after every stage (samples/stage-<i>-<name>.png), not only at the end


class RunSettings(Strict):
    """What every run is trained with, whether it comes from an experiment, a batch or a sweep's trial."""

    model: str
    seed: int = 0
    resolution: int = Field(default=512, ge=16)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    checkpoint_every: int = Field(default=0, ge=0)
    latent_variants: int = Field(default=16, ge=1)  # augmented copies of each photo, encoded once (see data.py)
    # the denoising loss counts only the subject: each concept's `masks` folder, augmented with its photos
    masked_loss: bool = False
    # non-square photos train at the bucket shape nearest their aspect ratio (same area) instead of a square crop
    aspect_buckets: bool = False
    samples: SampleSpec = SampleSpec()
    validation: ValidationSpec | None = None


class ConceptRuns(RunSettings):
    """Run settings for a list of concepts (inline, or a manifest file) at a common length scale."""

    concepts: list[ConceptSpec] | str = Field(min_length=1)
    steps_scale: float = Field(default=1.0, gt=0)

    def shared(self) -> dict[str, Any]:
        """The fields every ConceptRuns holds, as keyword arguments for another one (a batch's experiment)."""
        return {name: getattr(self, name) for name in ConceptRuns.model_fields}


class ExperimentConfig(ConceptRuns):
    """One method on a list of concepts (`personalize train`)."""

    method: str
    output_dir: str = "outputs"
    device: str = "auto"
    gradient_checkpointing: bool = False
    prior_cache_dir: str | None = None
    latent_cache_dir: str | None = None  # reuse encoded instance latents across runs and batches
    overrides: dict[str, Any] = {}


class RunSpec(RunSettings):
    """Everything one (concept, method) run needs, fully resolved."""

    method: MethodSpec
    concept: ConceptSpec
    output_dir: str
    device: str
    gradient_checkpointing: bool
    prior_cache_dir: str | None
    latent_cache_dir: str | None = None
    # the weights' content when `model` is a local folder: part of the config hash, so that a model retrained or
    # replaced at the same path never passes for the one a finished run was trained on
    model_fingerprint: str | None = None

    @model_validator(mode="after")
    def _validation_resolved(self) -> RunSpec:
        if self.validation is not None and self.validation.every is None:
            raise ValueError("validation.every is unset: give it, or use a method with a validation protocol")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.concept.id / self.method.name

    def config_hash(self) -> str:
        """Hash of everything that changes the learned result: not where the run is written or on what device, nor
        where its photos and a local model sit. Moved, or mounted at another path on another machine, they hold the
        same run; their content is what counts (DONE.json's `photos`, and `model_fingerprint`)."""
        return self._hash(with_locations=False)

    def config_hashes(self) -> tuple[str, str]:
        """Today's config hash, then the one that runs finished before it left the photos' and model's locations
        out carry: a run folder (or MLflow run) recorded under either is this run's."""
        return self.config_hash(), self._hash(with_locations=True)

    def owns(self, found: str | None) -> bool:
        """Whether a config hash recorded in a run folder is this run's."""
        return found is not None and found in self.config_hashes()

    def _hash(self, with_locations: bool) -> str:
        payload = self.model_dump(mode="json", exclude={
            "output_dir": True, "device": True, "samples": True, "prior_cache_dir": True, "latent_cache_dir": True,
            "checkpoint_every": True, "gradient_checkpointing": True,
            "method": {"evaluation": True, "validation": True, "summary": True, "paper": True, "stages": {"__all__": RECORD_ONLY},
                       "test_time": RECORD_ONLY},
            "concept": {"holdout": True}})
        # validation changes what a run exports only when it picks the best point
        if payload["validation"] is None or payload["validation"]["selection"] == "last":
            del payload["validation"]
        for option in ("masked_loss", "aspect_buckets"):  # added after runs were finished: hashed only when on
            if not payload[option]:
                del payload[option]
        if payload["method"]["augmentation_words"]:  # likewise, hashed only when the words are left out
            del payload["method"]["augmentation_words"]
        for stage in payload["method"]["stages"] + ([payload["method"]["test_time"]] if payload["method"]["test_time"] else []):
            for key, default in HASHED_WHEN_SET.items():
                if stage.get(key) == default:
                    del stage[key]
        if not with_locations:
            del payload["concept"]["images"], payload["concept"]["masks"]
            if payload["model_fingerprint"] is not None:
                del payload["model"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
