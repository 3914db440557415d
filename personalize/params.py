"""Named trainable selectors. Everything a stage does not select is frozen.

A stage with `lora` trains adapters on the modules its LoRA targets select (personalize/lora.py) instead of their
weights; a plain selector never picks adapter parameters."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

ATTN2 = re.compile(r"\.attn2\.(to_q|to_k|to_v|to_out\.0)\.")
ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.")
TEXT_ATTN = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.")
ADAPTER = re.compile(r"\.lora_[AB]\.[^.]+\.")  # peft's '<module>.lora_A.<adapter>.weight'

TEXT = ("text_encoder", "text_encoder_2")  # SDXL's second encoder is selected with the first, where there is one

# selector -> (which model(s), predicate on the parameter name within that model)
SELECTORS: dict[str, tuple[str | tuple[str, ...], Callable[[str], bool]]] = {
    "placeholder": (TEXT, lambda n: n.endswith("token_embedding.rows")),
    "unet": ("unet", lambda n: True),
    "unet.attn": ("unet", lambda n: bool(ATTN.search(n))),
    "unet.attn2": ("unet", lambda n: bool(ATTN2.search(n))),
    "unet.attn2.kv": ("unet", lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
    "unet.attn2.q": ("unet", lambda n: ".attn2.to_q." in n),
    "unet.attn2.out": ("unet", lambda n: ".attn2.to_out.0." in n),
    "text_encoder": (TEXT, lambda n: True),
    "text_encoder.attn": (TEXT, lambda n: bool(TEXT_ATTN.search(n))),
}

SELECTOR_HELP = {
    "placeholder": "the new placeholder rows only (never the embedding table)",
    "unet": "every UNet parameter",
    "unet.attn": "q, k, v and out projections of every self- and cross-attention layer",
    "unet.attn2": "q, k, v and out projections of every cross-attention layer",
    "unet.attn2.kv": "k and v projections of every cross-attention layer",
    "unet.attn2.q": "q projections of every cross-attention layer",
    "unet.attn2.out": "out projections of every cross-attention layer",
    "text_encoder": "every text-encoder parameter",
    "text_encoder.attn": "q, k, v and out projections of every text-encoder attention layer",
}


class SelectorError(ValueError):
    pass


def adapted_name(name: str) -> str | None:
    """The weight an adapter parameter belongs to ('a.to_k.lora_A.x.weight' -> 'a.to_k.weight'); None if it is none."""
    found = ADAPTER.search(name)
    return None if found is None else name[: found.start()] + ".weight"


def select(models: dict[str, nn.Module], selectors: list[str], adapters: bool = False) -> dict[str, nn.Parameter]:
    """Parameters picked by the selectors, keyed '<model>.<parameter name>': the modules' own weights, or with
    `adapters` the LoRA adapter parameters on the modules the selectors pick."""
    chosen: dict[str, nn.Parameter] = {}
    for selector in selectors:
        if selector not in SELECTORS:
            raise SelectorError(f"unknown trainable selector {selector!r}; available: {', '.join(SELECTORS)}")
        model_names, predicate = SELECTORS[selector]
        found = {}
        for model_name in [model_names] if isinstance(model_names, str) else model_names:
            if model_name not in models:
                continue
            for n, p in models[model_name].named_parameters():
                weight = adapted_name(n)
                if (weight is not None and adapters and predicate(weight)) or (weight is None and not adapters and predicate(n)):
                    found[f"{model_name}.{n}"] = p
        if not found:
            hint = " (this method uses an existing identifier word, so there are no placeholder rows)" if selector == "placeholder" else ""
            raise SelectorError(f"trainable selector {selector!r} matches no parameter{hint}")
        chosen.update(found)
    return chosen


def stage_parameters(models: dict[str, nn.Module], stage) -> dict[str, nn.Parameter]:
    """What a stage trains: its selectors' weights, and adapters where its `lora` puts them."""
    lora = set(stage.lora_targets)
    chosen = select(models, [s for s in stage.trainable if s not in lora])
    if lora:
        chosen.update(select(models, sorted(lora), adapters=True))
    return chosen


def trained_parameters(models: dict[str, nn.Module], stages) -> dict[str, nn.Parameter]:
    """Everything any of the stages trains."""
    chosen: dict[str, nn.Parameter] = {}
    for stage in stages:
        chosen.update(stage_parameters(models, stage))
    return chosen


def set_trainable(models: dict[str, nn.Module], stage) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze exactly what the stage trains; return it."""
    for model in models.values():
        model.requires_grad_(False)
    chosen = stage_parameters(models, stage)
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def text_side_frozen(models: dict[str, nn.Module]) -> bool:
    return not any(p.requires_grad for name in TEXT if name in models for p in models[name].parameters())

