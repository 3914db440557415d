"""How the methods' recipes scale to a base model.

The method YAMLs keep the papers' numbers, which were set for Stable Diffusion (an 860 M-parameter UNet). A much
smaller model trained at a higher learning rate needs larger steps to move: a model folder may carry
`recipe_scale.json`, measured on that model, saying by how much each kind of trainable's learning rate (and
optionally its stage length) is multiplied:

    {"lr": {"placeholder": 5, "unet.attn2": 10, "unet": 20}, "steps": {"unet": 2},
     "prompt_sets": {"ti_object": "world_captions", "context": "world_context"},
     "prompts": {"photo of a {placeholder} {super_category}": "a photo of a {placeholder} {super_category}"},
     "augmentation_words": false, "source": "how it was measured"}

Keys are trainable selectors (`personalize.params.SELECTORS`); a key also covers the selectors below it
(`unet.attn2` covers `unet.attn2.kv`). A stage takes the scale of its widest trainable (whole UNet, then
cross-attention, then the text encoder, then placeholder rows), so Custom Diffusion's k/v + modifier-token stage
scales as attention. SD models carry no file and train with the papers' numbers. The scale is applied to the
recipe before dotted overrides, so an override names the effective value.

`prompt_sets` speaks the model's language: a model whose text encoder knows only its own caption grammar (the micro
world) names the prompt sets that replace the papers' English ones: a training-caption set (`@ti_object`) by name,
and `context` for CoRe's regularisation templates whatever the concept's kind. `prompts` says single templates
(a method's training prompt, a stage's, a class-prior prompt) in the model's grammar, and `augmentation_words:
false` trains augmented crops under the plain prompt (Custom Diffusion's "a far away" and "zoomed in" are words
such a model never saw; the crops keep their loss mask).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from personalize.errors import ConfigError

SCALE_FILE = "recipe_scale.json"
WIDTH_ORDER = ("unet", "unet.attn2", "text_encoder", "placeholder")  # widest first


def _covers(key: str, selector: str) -> bool:
    return selector == key or selector.startswith(key + ".")


def _width_rank(selector: str) -> int:
    """Rank of the most specific kind covering the selector (0: the whole UNet, the widest)."""
    ranks = [i for i, kind in enumerate(WIDTH_ORDER) if _covers(kind, selector)]
    return max(ranks) if ranks else len(WIDTH_ORDER)


class RecipeScale(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: dict[str, float] = {}
    steps: dict[str, float] = {}
    prompt_sets: dict[str, str] = {}
    prompts: dict[str, str] = {}  # a template as the method writes it -> the same in the model's grammar
    augmentation_words: bool = True  # False: the model knows no words for an augmentation's zoom
    source: str = ""  # how the numbers were measured

    @staticmethod
    def factor(table: dict[str, float], trainable: list[str]) -> float:
        """The multiplier of a stage training `trainable`: the most specific entry covering its widest selector."""
        if not trainable:
            return 1.0
        widest = min(trainable, key=_width_rank)
        keys = [k for k in table if _covers(k, widest)]
        return table[max(keys, key=len)] if keys else 1.0


def _scale_file_text(model: str) -> tuple[str | None, str]:
    """The model's recipe_scale.json text (a local folder or an s3 prefix), or None; and where it was looked for."""
    if model.startswith("s3://"):
        from personalize import storage

        uri = f"{model.rstrip('/')}/{SCALE_FILE}"
        return (storage.read_bytes(uri).decode() if storage.exists(uri) else None), uri
    path = Path(model).expanduser() / SCALE_FILE
    return (path.read_text() if "://" not in model and path.is_file() else None), str(path)


def load_recipe_scale(model: str) -> RecipeScale | None:
    """The model folder's recipe scale, or None (hub ids and folders or s3 prefixes without the file)."""
    from personalize.params import SELECTORS

    text, path = _scale_file_text(model)
    if text is None:
        return None
    try:
        scale = RecipeScale.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise ConfigError(path, [f"not valid JSON ({e.msg}, line {e.lineno}); fix or remove the file"]) from None
    except ValidationError as e:
        raise ConfigError(path, [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]) from None
    problems = [
        f"{table}.{key}: unknown trainable selector; available: {', '.join(SELECTORS)}"
        for table in ("lr", "steps") for key in getattr(scale, table) if key not in SELECTORS
    ] + [
        f"{table}.{key}: got {value}; a multiplier must be > 0"
        for table in ("lr", "steps") for key, value in getattr(scale, table).items() if value <= 0
    ]
    problems += _unknown_prompt_sets(scale.prompt_sets)
    problems += _bad_templates(scale.prompts)
    if problems:
        raise ConfigError(path, problems)
    return scale


def describe_scale(scale: RecipeScale) -> str:
    """One line for people: what the model's recipe_scale.json changes."""
    parts = [f"lr x{v:g} {k}" for k, v in scale.lr.items()] + [f"steps x{v:g} {k}" for k, v in scale.steps.items()]
    parts += [f"prompt set {k} -> {v}" for k, v in scale.prompt_sets.items()]
    parts += [f"template '{k}' -> '{v}'" for k, v in scale.prompts.items()]
    if not scale.augmentation_words:
        parts.append("no words from an augmentation (custom_diffusion's 'a far away')")
    return f"recipes scaled by its {SCALE_FILE} ({'; '.join(parts)}); (xN) marks a scaled number"


def _unknown_prompt_sets(mapping: dict[str, str]) -> list[str]:
    from personalize.prompts import available_prompt_sets

    known = set(available_prompt_sets())
    return [f"prompt_sets.{key}: unknown prompt set {value!r}; available: {', '.join(sorted(known))}"
            for key, value in mapping.items() if value not in known]


def _bad_templates(mapping: dict[str, str]) -> list[str]:
    """A template's replacement must fill the same fields: it is used wherever the original was."""
    from string import Formatter

    def fields(text: str) -> set[str] | None:
        try:
            return {name for _, name, _, _ in Formatter().parse(text) if name is not None}
        except ValueError:  # an unbalanced brace
            return None

    problems = []
    for before, after in mapping.items():
        found = [fields(before), fields(after)]
        if None in found:
            problems.append(f"prompts: {before!r} -> {after!r}: a brace without its pair; write fields as {{name}}")
        elif found[0] != found[1]:
            problems.append(f"prompts: {before!r} -> {after!r} fills {sorted(found[1])}, not {sorted(found[0])}; a "
                            "template must keep its fields")
    return problems


def scaled_lengths(stage: dict[str, Any], factor: float) -> dict[str, Any]:
    """A raw stage's step counts times `factor`: its length, warmup and a norm-lock window given in steps (a
    window given as fractions follows the stage by itself)."""
    update: dict[str, Any] = {"steps": max(1, round(stage["steps"] * factor))}
    if isinstance(stage.get("warmup_steps"), int):
        update["warmup_steps"] = round(stage["warmup_steps"] * factor)
    lock = stage.get("embedding_norm_lock")
    if isinstance(lock, dict) and isinstance(lock.get("start"), int) and isinstance(lock.get("end"), int):
        start = max(1, round(lock["start"] * factor))
        update["embedding_norm_lock"] = {**lock, "start": start, "end": max(start + 1, round(lock["end"] * factor))}
    return update


def scale_recipe(raw_method: dict[str, Any], scale: RecipeScale | None) -> dict[str, Any]:
    """A raw method dict (as read from its YAML) with every stage's lr and steps multiplied by the model's scale.
    Each scaled stage records the factors it got (`model_lr_scale`, `model_steps_scale`), so the resolved config holds the
    effective numbers and says how they came from the paper's."""
    from personalize.augment import WORDED

    if scale is None:
        return raw_method

    def scaled(stage: dict[str, Any]) -> dict[str, Any]:
        trainable = stage.get("trainable") or []
        lr_factor, steps_factor = scale.factor(scale.lr, trainable), scale.factor(scale.steps, trainable)
        stage = dict(stage)
        if "prompt" in stage:
            stage["prompt"] = spoken(stage["prompt"])
        if lr_factor != 1.0 and isinstance(stage.get("lr"), (int, float)):
            stage["lr"] = float(stage["lr"]) * lr_factor
            stage["model_lr_scale"] = lr_factor
        if steps_factor != 1.0 and isinstance(stage.get("steps"), int):
            stage.update(scaled_lengths(stage, steps_factor))
            stage["model_steps_scale"] = steps_factor
        return stage

    def spoken(prompt: Any) -> Any:
        if isinstance(prompt, list):
            return [spoken(p) for p in prompt]
        if isinstance(prompt, str) and prompt.startswith("@") and prompt[1:] in scale.prompt_sets:
            return "@" + scale.prompt_sets[prompt[1:]]
        if isinstance(prompt, str) and prompt in scale.prompts:
            return scale.prompts[prompt]
        return prompt

    out = dict(raw_method)
    if "prompt" in out:
        out["prompt"] = spoken(out["prompt"])
    if isinstance(out.get("class_prior"), dict) and "prompt" in out["class_prior"]:
        out["class_prior"] = {**out["class_prior"], "prompt": spoken(out["class_prior"]["prompt"])}
    if not scale.augmentation_words and out.get("augmentation") in WORDED:
        out["augmentation_words"] = False
    if out.get("context_prompts") is not None and "context" in scale.prompt_sets:
        out["context_prompts"] = scale.prompt_sets["context"]
    if isinstance(out.get("stages"), list):
        out["stages"] = [scaled(s) if isinstance(s, dict) else s for s in out["stages"]]
    if isinstance(out.get("test_time"), dict):
        out["test_time"] = scaled(out["test_time"])
    return out
