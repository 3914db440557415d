"""Named trainable selectors. Everything a stage does not select is frozen."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

ATTN2 = re.compile(r"\.attn2\.(to_q|to_k|to_v|to_out\.0)\.")

# selector -> (which model, predicate on the parameter name within that model)
SELECTORS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "placeholder": ("text_encoder", lambda n: n.endswith("token_embedding.rows")),
    "unet": ("unet", lambda n: True),
    "unet.attn2": ("unet", lambda n: bool(ATTN2.search(n))),
    "unet.attn2.kv": ("unet", lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
    "unet.attn2.q": ("unet", lambda n: ".attn2.to_q." in n),
    "unet.attn2.out": ("unet", lambda n: ".attn2.to_out.0." in n),
    "text_encoder": ("text_encoder", lambda n: True),
}

SELECTOR_HELP = {
    "placeholder": "the new placeholder rows only (never the embedding table)",
    "unet": "every UNet parameter",
    "unet.attn2": "q, k, v and out projections of every cross-attention layer",
    "unet.attn2.kv": "k and v projections of every cross-attention layer",
    "unet.attn2.q": "q projections of every cross-attention layer",
    "unet.attn2.out": "out projections of every cross-attention layer",
    "text_encoder": "every text-encoder parameter",
}


class SelectorError(ValueError):
    pass


def select(models: dict[str, nn.Module], selectors: list[str]) -> dict[str, nn.Parameter]:
    """Parameters picked by the selectors, keyed '<model>.<parameter name>'."""
    chosen: dict[str, nn.Parameter] = {}
    for selector in selectors:
        if selector not in SELECTORS:
            raise SelectorError(f"unknown trainable selector {selector!r}; available: {', '.join(SELECTORS)}")
        model_name, predicate = SELECTORS[selector]
        found = {f"{model_name}.{n}": p for n, p in models[model_name].named_parameters() if predicate(n)}
        if not found:
            hint = " (this method uses an existing identifier word, so there are no placeholder rows)" if selector == "placeholder" else ""
            raise SelectorError(f"trainable selector {selector!r} matches no parameter{hint}")
        chosen.update(found)
    return chosen


def set_trainable(models: dict[str, nn.Module], selectors: list[str]) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze exactly the selected parameters; return them."""
    for model in models.values():
        model.requires_grad_(False)
    chosen = select(models, selectors)
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def text_side_frozen(models: dict[str, nn.Module]) -> bool:
    return not any(p.requires_grad for p in models["text_encoder"].parameters())

