"""Typed, strict configuration: methods as data, experiments, concepts.

Unknown keys are errors; every problem in a file is reported at once with the file, the key,
the value received and what was expected. Defaults live here and nowhere else.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from personalize.errors import ConfigError
from personalize.fingerprint import local_model_fingerprint
from personalize.scaling import RecipeScale, load_recipe_scale, scale_recipe

SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
RECORD_ONLY = {"model_lr_scale", "model_steps_scale"}  # stage fields that record how numbers came about
CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Methods


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
    losses: dict[str, LossSpec] = Field(min_length=1)
    use_class_prior: bool = False
    embedding_norm_lock: NormLockSpec | None = None
    prompt: str | list[str] | None = None  # replaces the method's training prompt(s) in this stage
    context_prompts: list[str] | None = None  # replaces the regularisation templates (test-time optimisation)
    # set from the model's recipe_scale.json: lr = paper lr x this (a record: the effective lr is what is hashed)
    model_lr_scale: float = Field(default=1.0, gt=0)
    model_steps_scale: float = Field(default=1.0, gt=0)  # likewise for steps

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


class MethodSpec(Strict):
    name: str
    paper: str = ""
    summary: str = ""
    placeholder: PlaceholderSpec = PlaceholderSpec()
    prompt: str | list[str] = "a photo of a {placeholder} {super_category}"
    augmentation: Literal["ti", "dreambooth", "attn", "custom_diffusion"] = "dreambooth"
    class_prior: ClassPriorSpec | None = None
    context_prompts: str | None = None
    attention: AttentionSpec = AttentionSpec()
    evaluation: EvalProtocol = EvalProtocol()
    stages: list[StageSpec] = Field(min_length=1)
    test_time: StageSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
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


# --------------------------------------------------------------------------------------------
# Concepts and experiments


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


class ExperimentConfig(Strict):
    model: str
    method: str
    concepts: list[ConceptSpec] | str = Field(min_length=1)
    output_dir: str = "outputs"
    seed: int = 0
    resolution: int = Field(default=512, ge=16)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(default=0, ge=0)
    latent_variants: int = Field(default=16, ge=1)  # augmented copies of each photo, encoded once (see data.py)
    prior_cache_dir: str | None = None
    latent_cache_dir: str | None = None  # reuse encoded instance latents across runs and batches
    samples: SampleSpec = SampleSpec()
    steps_scale: float = Field(default=1.0, gt=0)
    overrides: dict[str, Any] = {}


class RunSpec(Strict):
    """Everything one (concept, method) run needs, fully resolved."""

    model: str
    method: MethodSpec
    concept: ConceptSpec
    output_dir: str
    seed: int
    resolution: int
    mixed_precision: Literal["auto", "no", "fp16", "bf16"]
    device: str
    gradient_checkpointing: bool
    checkpoint_every: int
    latent_variants: int
    prior_cache_dir: str | None
    latent_cache_dir: str | None = None
    samples: SampleSpec
    # the weights' content when `model` is a local folder: part of the config hash, so that a model retrained or
    # replaced at the same path never passes for the one a finished run was trained on
    model_fingerprint: str | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.concept.id / self.method.name

    def config_hash(self) -> str:
        """Hash of everything that changes the learned result (not where it is written or on what device)."""
        payload = self.model_dump(mode="json", exclude={
            "output_dir": True, "device": True, "samples": True, "prior_cache_dir": True, "latent_cache_dir": True,
            "checkpoint_every": True, "gradient_checkpointing": True,
            "method": {"evaluation": True, "summary": True, "paper": True, "stages": {"__all__": RECORD_ONLY},
                       "test_time": RECORD_ONLY},
            "concept": {"holdout": True}})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading


def format_validation_error(error: ValidationError, data: Any) -> list[str]:
    """One line per problem: dotted key (stages named, not numbered), value received, what is expected."""
    problems = []
    for e in error.errors():
        loc = _readable_loc(e["loc"], data)
        received = e.get("input")
        expected = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            expected = "no such key (unknown keys are errors)"
        elif e["type"] == "missing":
            problems.append(f"{loc}: missing; this key is required")
            continue
        if isinstance(received, (dict, list)):  # a check across several keys: the message names them
            problems.append(f"{loc}: {expected}")
            continue
        problems.append(f"{loc}: got {_short(received)}; {expected}")
    return problems


def _readable_loc(loc: tuple, data: Any) -> str:
    parts, node = [], data
    for key in loc:
        if isinstance(key, int) and isinstance(node, list):
            item = node[key] if key < len(node) else None
            label = item.get("name") or item.get("id") if isinstance(item, dict) else None
            parts.append(str(label) if label else f"[{key}]")
            node = item
        else:
            parts.append(str(key))
            node = node.get(key) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["file not found"])
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None


def parse_override(text: str) -> tuple[str, Any]:
    """`stages.identity.steps=200` -> ("stages.identity.steps", 200); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError("command line", [f"override {text!r} must look like key.path=value"])
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError("command line", [f"override {text!r}: the value is not valid YAML ({e})"]) from None


def apply_overrides(data: dict, overrides: dict[str, Any], source: str) -> dict:
    """Set dotted paths in a raw config dict; list items (stages) are addressed by their name."""
    data = copy.deepcopy(data)
    problems = []
    for path, value in overrides.items():
        node = data
        keys = path.split(".")
        try:
            for key in keys[:-1]:
                node = _child(node, key, create=True)
            last = keys[-1]
            if isinstance(node, list):
                raise KeyError(f"'{last}' addresses a list; name an item")
            node[last] = value
        except KeyError as e:
            problems.append(f"override {path}: {e.args[0]}")
    if problems:
        raise ConfigError(source, problems)
    return data


def _child(node: Any, key: str, create: bool) -> Any:
    if isinstance(node, list):
        for item in node:
            if isinstance(item, dict) and item.get("name") == key:
                return item
        names = [i.get("name") for i in node if isinstance(i, dict)]
        raise KeyError(f"no item named '{key}' (have: {names})")
    if not isinstance(node, dict):
        raise KeyError(f"'{key}' is below a value, not a section")
    if key not in node or node[key] is None:
        if not create:
            raise KeyError(f"no key '{key}'")
        node[key] = {}
    return node[key]


def method_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return CONFIG_ROOT / "methods" / f"{name_or_path}.yaml"


def available_methods() -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / "methods").glob("*.yaml"))


def load_method(name_or_path: str, overrides: dict[str, Any] | None = None, scale: RecipeScale | None = None) -> MethodSpec:
    """A method from configs/methods (or a YAML path), scaled to the model (`scale`), then overridden."""
    path = method_path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            str(path), [f"unknown method {name_or_path!r}; available: {', '.join(available_methods())}"]
        )
    raw = scale_recipe(read_yaml(path), scale)
    if overrides:
        raw = apply_overrides(raw, {**overrides, **_unscaled(overrides)} if scale else overrides, f"{path} (with overrides)")
    return validate(MethodSpec, raw, str(path))


def _unscaled(overrides: dict[str, Any]) -> dict[str, Any]:
    """An overridden lr or length is an effective value: its stage no longer records a model scale for it."""
    marks = {".lr": ".model_lr_scale", ".steps": ".model_steps_scale"}
    return {key.removesuffix(end) + mark: 1.0 for key in overrides for end, mark in marks.items()
            if key.endswith(end) and key.startswith(("stages.", "test_time."))}


def validate(model: type[BaseModel], data: Any, source: str):
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e, data)) from None


METHOD_KEYS = set(MethodSpec.model_fields)


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route dotted overrides: keys of a method (stages, placeholder, ...) go to the method, the rest to the experiment."""
    method, experiment = {}, {}
    for key, value in overrides.items():
        head = key.removeprefix("method.").split(".")[0]
        if key.startswith("method.") or head in METHOD_KEYS:
            method[key.removeprefix("method.")] = value
        else:
            experiment[key] = value
    return method, experiment


def load_experiment(path: str | Path, cli_overrides: list[str] | None = None) -> list[RunSpec]:
    """Read an experiment file, apply file and command-line overrides, resolve one RunSpec per concept."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["expected a mapping at the top level"])
    overrides = dict(raw.get("overrides") or {})
    overrides.update(dict(parse_override(o) for o in cli_overrides or []))
    method_over, exp_over = split_overrides(overrides)
    raw = apply_overrides({k: v for k, v in raw.items() if k != "overrides"}, exp_over, str(path))
    raw["overrides"] = method_over
    experiment = validate(ExperimentConfig, raw, str(path))
    return resolve_runs(experiment, base_dir=path.parent)


def scale_steps(method: MethodSpec, scale: float) -> MethodSpec:
    """Every stage's length (and its warmup and norm-lock window) times `scale`, at least one step: quick trials."""
    if scale == 1.0:
        return method

    def scaled(n: int) -> int:
        return max(1, round(n * scale))

    def stage(s: StageSpec) -> StageSpec:
        update = {"steps": scaled(s.steps), "warmup_steps": round(s.warmup_steps * scale)}
        lock = s.embedding_norm_lock
        if lock is not None and lock.start is not None:  # a window in steps shrinks with the stage
            start = scaled(lock.start)
            update["embedding_norm_lock"] = NormLockSpec(start=start, end=max(start + 1, scaled(lock.end)))
        return s.model_copy(update=update)

    return method.model_copy(update={"stages": [stage(s) for s in method.stages]})


def resolve_model(model: str, base_dir: Path | None) -> str:
    """A model given as a relative path (./x, ../x) is relative to the experiment file; hub ids and uris stay."""
    if base_dir is not None and model.startswith(("./", "../")):
        return str((base_dir / model).resolve())
    return str(Path(model).expanduser()) if model.startswith("~") else model


def resolve_runs(experiment: ExperimentConfig, base_dir: Path | None = None) -> list[RunSpec]:
    model = resolve_model(experiment.model, base_dir)
    method = scale_steps(load_method(experiment.method, experiment.overrides, load_recipe_scale(model)), experiment.steps_scale)
    concepts = experiment.concepts
    if isinstance(concepts, str):
        concepts = load_manifest(_relative(concepts, base_dir))  # image paths relative to the manifest
    elif base_dir is not None:
        concepts = [_resolve_concept(c, base_dir) for c in concepts]
    fingerprint = local_model_fingerprint(model)
    runs = []
    for concept in concepts:
        runs.append(
            RunSpec(
                model=model,
                model_fingerprint=fingerprint,
                method=method,
                concept=concept,
                **experiment.model_dump(exclude={"model", "method", "concepts", "overrides", "steps_scale"}),
            )
        )
    return runs


def _resolve_concept(concept: ConceptSpec, base_dir: Path) -> ConceptSpec:
    """Image, mask and holdout folders relative to the file that names them (uris stay as they are)."""
    update = {}
    for key in ("images", "masks", "holdout"):
        value = getattr(concept, key)
        if value and "://" not in value:
            update[key] = str(_relative(value, base_dir))
    return concept.model_copy(update=update)


def _relative(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else (base_dir / p).resolve()


def read_manifest(path: str | Path) -> tuple[list[ConceptSpec], dict[str, str]]:
    """The good concepts of a YAML list, JSON lines or CSV file, and label -> reason for each bad row. A file that
    cannot be read as a list of concepts at all is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["concepts manifest not found"])
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        rows = read_yaml(path)
        rows = rows.get("concepts", rows) if isinstance(rows, dict) else rows
    elif suffix in (".jsonl", ".json"):
        rows, bad = [], []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    bad.append(f"line {number}: not valid JSON ({e.msg})")
        if bad:
            raise ConfigError(str(path), bad)
    elif suffix == ".csv":
        with path.open(newline="") as f:
            rows = [{k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(f)]
    else:
        raise ConfigError(str(path), [f"unknown manifest format {suffix!r}; use .yaml, .jsonl or .csv"])
    if not isinstance(rows, list) or not rows:
        raise ConfigError(str(path), ["expected a non-empty list of concepts"])
    return _validate_rows(rows, path)


def load_manifest(path: str | Path) -> list[ConceptSpec]:
    """Concepts from a YAML list, JSON lines or CSV file; all bad rows are reported together."""
    concepts, bad = read_manifest(path)
    if bad:
        raise ConfigError(str(path), [f"concept {label}: {reason}" for label, reason in bad.items()])
    return concepts


def _validate_rows(rows: list, path: Path) -> tuple[list[ConceptSpec], dict[str, str]]:
    """Valid concepts, and label -> reason for each row that is not (a duplicated id fails every row holding it)."""
    concepts, bad = [], {}
    for i, row in enumerate(rows):
        label = str(row.get("id", f"[{i}]")) if isinstance(row, dict) else f"[{i}]"
        try:
            concepts.append(_resolve_concept(ConceptSpec.model_validate(row), path.parent))
        except ValidationError as e:
            bad[label if label not in bad else f"{label} (row {i + 1})"] = "; ".join(format_validation_error(e, row))
    ids = [c.id for c in concepts]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        folders = ", ".join(c.images for c in concepts if c.id == dup)
        bad[dup] = f"concept id {dup!r} appears more than once (images {folders}); give each concept its own id"
    return [c for c in concepts if c.id not in bad], bad
