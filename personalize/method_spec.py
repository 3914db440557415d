"""The method schema: a method is data (stages, losses, placeholder, class prior, evaluation protocol), checked
strictly: unknown keys are errors and every problem in a file is reported at once (see personalize/config.py)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
RECORD_ONLY = {"model_lr_scale", "model_steps_scale"}  # stage fields that record how numbers came about
# stage fields added after runs were finished: hashed only when set otherwise, so those runs keep their hash
HASHED_WHEN_SET = {"optimizer": "adamw", "lr_schedule": "constant", "noise_offset": 0.0, "lora": None, "ema_decay": None}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LossSpec(BaseModel):
    """A weighted loss term; any other key is a parameter of the term, checked against its schema."""

    model_config = ConfigDict(extra="allow")
    weight: float = 1.0

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class NormLockSpec(Strict):
    """Freeze the placeholder rows' norms: record them after update `start`, rescale after updates start+1..end.
    Give steps (start, end) or fractions of the stage (start_fraction, end_fraction): fractions follow the
    stage when its length is overridden or searched."""

    start: int | None = Field(default=None, ge=1)
    end: int | None = None
    start_fraction: float | None = Field(default=None, gt=0, lt=1)
    end_fraction: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_form(self) -> NormLockSpec:
        steps = self.start is not None and self.end is not None
        fractions = self.start_fraction is not None and self.end_fraction is not None
        if steps == fractions or (steps and (self.start_fraction or self.end_fraction)) or \
                (fractions and (self.start or self.end)):
            raise ValueError("give either start and end (steps) or start_fraction and end_fraction")
        low, high = (self.start, self.end) if steps else (self.start_fraction, self.end_fraction)
        if high <= low:
            raise ValueError(f"the window must end after it starts (got {low} .. {high})")
        return self

    def window(self, steps: int) -> tuple[int, int]:
        """The (record, last rescale) update numbers for a stage of `steps` updates."""
        if self.start is not None:
            return self.start, self.end
        start = max(1, round(self.start_fraction * steps))
        return start, max(start + 1, round(self.end_fraction * steps))


class LoraSpec(Strict):
    """Train low-rank adapters (peft LoRA) on the modules of `targets` instead of their weights: W x + (alpha / rank)
    B A x, with B starting at zero. `targets` are trainable selectors of the stage (default: all but the
    placeholder); only Linear and Conv2d modules get adapters. One shape (rank, alpha, dropout) per model and method."""

    rank: int = Field(default=4, ge=1)
    alpha: float | None = Field(default=None, gt=0)  # None: alpha = rank (scale 1), as the diffusers recipes
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[str] | None = None

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class StageSpec(Strict):
    name: str
    trainable: list[str] = Field(min_length=1)
    steps: int = Field(ge=1)  # a stage of no steps would train nothing and still report a finished run
    lr: float = Field(gt=0)
    batch_size: int = Field(default=1, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=1e-2, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    optimizer: str = "adamw"  # a name in personalize/optim.py OPTIMIZERS
    lr_schedule: str = "constant"  # a name in personalize/optim.py SCHEDULES (constant after warmup, cosine)
    # noise + offset x N(0, 1) per (sample, channel): lets the model learn darker or brighter images than average
    noise_offset: float = Field(default=0.0, ge=0)
    losses: dict[str, LossSpec] = Field(min_length=1)
    use_class_prior: bool = False
    embedding_norm_lock: NormLockSpec | None = None
    prompt: str | list[str] | None = None  # replaces the method's training prompt(s) in this stage
    context_prompts: list[str] | None = None  # replaces the regularisation templates (test-time optimisation)
    # set from the model's recipe_scale.json: lr = paper lr x this (a record: the effective lr is what is hashed)
    model_lr_scale: float = Field(default=1.0, gt=0)
    model_steps_scale: float = Field(default=1.0, gt=0)  # likewise for steps
    lora: LoraSpec | None = None  # the selected UNet / text-encoder parts train as LoRA adapters
    # an EMA of the trained weights, sampled, validated and exported instead of them (personalize/ema.py)
    ema_decay: float | None = Field(default=None, gt=0, lt=1)

    @property
    def lora_targets(self) -> list[str]:
        """The selectors trained through adapters (none without `lora`)."""
        if self.lora is None:
            return []
        return self.lora.targets if self.lora.targets is not None else [t for t in self.trainable if t != "placeholder"]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not STAGE_NAME.match(v):
            raise ValueError("a stage name is lower-case letters, digits and '_', starting with a letter")
        return v

    @field_validator("losses", mode="before")
    @classmethod
    def _weights_as_specs(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"weight": w} if isinstance(w, (int, float)) else w) for k, w in v.items()}
        return v

    @model_validator(mode="after")
    def _known_losses(self) -> StageSpec:
        from personalize.losses import validate_loss_params
        from personalize.optim import OPTIMIZERS, SCHEDULES

        for kind, name, known in (("optimizer", self.optimizer, OPTIMIZERS), ("lr_schedule", self.lr_schedule, SCHEDULES)):
            if name not in known:
                raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(known))}")

        for term, spec in self.losses.items():
            validate_loss_params(term, spec.params)
        lock = self.embedding_norm_lock
        if lock is not None:
            if "placeholder" not in self.trainable:
                raise ValueError("embedding_norm_lock needs the placeholder among the trainable parts")
            if lock.window(self.steps)[1] > self.steps:
                raise ValueError(f"embedding_norm_lock ends at update {lock.window(self.steps)[1]}, beyond the stage's "
                                 f"{self.steps} steps: shorten the window too, or give it as start_fraction/end_fraction")
        for text in ([self.prompt] if isinstance(self.prompt, str) else self.prompt or []):
            check_template(text, PROMPT_FIELDS)
        if self.lora is not None:
            targets = self.lora_targets
            if not targets:
                raise ValueError("lora needs a UNet or text-encoder selector among the trainable parts to put adapters on")
            if "placeholder" in targets:
                raise ValueError("the placeholder rows train as they are; leave 'placeholder' out of lora.targets")
            strays = [t for t in targets if t not in self.trainable]
            if strays:
                raise ValueError(f"lora.targets {strays} are not among the stage's trainable parts {self.trainable}")
        return self


class PlaceholderSpec(Strict):
    """How the concept is named in prompts.

    new_token: add `vectors` new token(s) named `string` (formatted with {concept} and, for several
    subjects, {index}); init is "super_category", a word, or "id:<token id>" (a list: one per subject).
    new_token false: `string` is an existing word used as-is (DreamBooth's "sks"); nothing is learned there.
    """

    new_token: bool = True
    string: str = "<{concept}>"
    vectors: int = Field(default=1, ge=1, le=16)
    init: str | list[str] = "super_category"


class ClassPriorSpec(Strict):
    """Class-prior (regularisation) images: generated by the base model, or a folder of real images.

    prompt: {super_category} is the (first) subject's class, {classes} all of them ("a cat and a dog").
    mode: concat puts as many priors as instances in every batch (DreamBooth); mixed makes each batch slot a
    prior with probability 1/2, all in one loss (Custom Diffusion, DisenDiff).
    """

    prompt: str = "a photo of a {super_category}"
    num_images: int = Field(default=100, ge=1)
    mode: Literal["concat", "mixed"] = "concat"
    inference_steps: int = Field(default=50, ge=1)
    guidance_scale: float = 7.5
    scheduler: Literal["ddim", "dpm"] = "ddim"
    eta: float = Field(default=0.0, ge=0.0, le=1.0)
    folder: str | None = None


class AttentionSpec(Strict):
    detach_start_token: bool = False


class EvalProtocol(Strict):
    """How the method's paper samples for evaluation."""

    scheduler: Literal["ddim", "dpm"] = "ddim"
    steps: int = Field(default=50, ge=1)
    guidance_scale: float = 7.5
    eta: float = Field(default=0.0, ge=0.0, le=1.0)


class ValidationProtocol(Strict):
    """How the method's paper picks a checkpoint, used where a run's `validation` leaves it open: a point every
    `every_fraction` of the run's steps (so it follows the stages' lengths), the rule and the objective."""

    every_fraction: float = Field(gt=0, le=1)
    selection: Literal["last", "best"] = "best"
    objective: dict[Literal["clip_t", "clip_i", "dino"], float] = {"clip_i": 1.0}


class MethodSpec(Strict):
    name: str
    paper: str = ""
    summary: str = ""
    placeholder: PlaceholderSpec = PlaceholderSpec()
    prompt: str | list[str] = "a photo of a {placeholder} {super_category}"
    augmentation: str = "dreambooth"  # a preset registered in personalize/augment.py
    augmentation_words: bool = True  # a worded preset's caption words ("a far away", "zoomed in"); False: left out
    class_prior: ClassPriorSpec | None = None
    context_prompts: str | None = None
    attention: AttentionSpec = AttentionSpec()
    evaluation: EvalProtocol = EvalProtocol()
    validation: ValidationProtocol | None = None
    stages: list[StageSpec] = Field(min_length=1)
    test_time: StageSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
        from personalize.augment import AUGMENTATIONS

        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augmentation!r}; available: {', '.join(sorted(AUGMENTATIONS))}")
        for text in ([self.prompt] if isinstance(self.prompt, str) else self.prompt):
            if not text.startswith("@"):
                check_template(text, PROMPT_FIELDS)
        if self.class_prior is not None:
            check_template(self.class_prior.prompt, {"super_category", "classes"})
        check_template(self.placeholder.string, {"concept", "index"})
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes}")
        if any(s.use_class_prior for s in self.stages) and self.class_prior is None:
            raise ValueError("a stage sets use_class_prior but the method has no class_prior section")
        shapes: dict[str, set] = {}
        for stage in self.stages + ([self.test_time] if self.test_time else []):
            for target in stage.lora_targets:
                model = "text_encoder" if target.startswith("text_encoder") else "unet"
                shapes.setdefault(model, set()).add((stage.lora.rank, stage.lora.scale_alpha, stage.lora.dropout))
        mixed = [m for m, found in shapes.items() if len(found) > 1]
        if mixed:
            raise ValueError(f"the stages give the {mixed[0]} LoRA different shapes {sorted(shapes[mixed[0]])}: one "
                             "(rank, alpha, dropout) per model, as one adapter file holds it")
        needs_context = any(_needs_context(s) for s in self.stages + ([self.test_time] if self.test_time else []))
        if needs_context and not self.context_prompts:
            raise ValueError("context regularisers need `context_prompts` (auto, animate, inanimate, universal or a file)")
        return self


PROMPT_FIELDS = {"placeholder", "super_category", "subjects", ""}


def check_template(text: str, allowed: set[str]) -> None:
    """A prompt template may only name the fields it will be filled with."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise ValueError(f"template {text!r} is malformed ({e})") from None
    unknown = sorted(fields - allowed)
    if unknown:
        raise ValueError(f"template {text!r} names unknown fields {unknown}; allowed: {sorted(f for f in allowed if f)}")


def _needs_context(stage: StageSpec) -> bool:
    from personalize.losses import term_needs

    return any(term_needs(t, spec.params).context for t, spec in stage.losses.items())
