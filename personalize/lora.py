"""LoRA adapters (peft) for stages that say `lora`: put on the models once per run, before any stage, on every
Linear / Conv2d module some stage's LoRA targets select; only the adapters of those modules train.

In the learned state an adapter is '<model>.<module>.lora_A.learned.weight' (and lora_B); the run's exports carry
them in the layouts other tools load: diffusers' (`pipe.load_lora_weights`) and kohya's (A1111, Forge, ComfyUI).
"""

from __future__ import annotations

import torch
from torch import nn

from personalize.method_spec import LoraSpec, StageSpec
from personalize.params import SELECTORS, SelectorError, adapted_name

ADAPTER_NAME = "learned"
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def lora_layout(stages: list[StageSpec]) -> dict[str, tuple[LoraSpec, list[str]]]:
    """model name -> (its LoRA shape, the selectors whose modules carry adapters), over all the stages."""
    layout: dict[str, tuple[LoraSpec, list[str]]] = {}
    for stage in stages:
        for target in stage.lora_targets:
            model = SELECTORS[target][0]
            if not isinstance(model, str):  # text-encoder LoRA adapts the first encoder (SDXL's second keeps none)
                model = model[0]
            spec, selectors = layout.get(model, (stage.lora, []))
            layout[model] = (spec, sorted({*selectors, target}))
    return layout


def target_modules(model: nn.Module, selectors: list[str]) -> list[str]:
    """The Linear / Conv2d modules whose weight one of the selectors picks."""
    predicates = [SELECTORS[s][1] for s in selectors]
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, (nn.Linear, nn.Conv2d)) and any(p(f"{name}.weight") for p in predicates))


def add_adapters(models: dict[str, nn.Module], stages: list[StageSpec], seed: int) -> dict[str, list[str]]:
    """Inject the method's adapters (B = 0, so the models compute exactly what they did); returns each model's
    adapted modules. A's initial values come from `seed`, not from whatever the global generator holds."""
    from peft import LoraConfig, inject_adapter_in_model

    adapted = {}
    for model_name, (spec, selectors) in lora_layout(stages).items():
        model = models[model_name]
        modules = target_modules(model, selectors)
        if not modules:
            raise SelectorError(f"lora targets {selectors} select no Linear or Conv2d module of the {model_name}")
        config = LoraConfig(r=spec.rank, lora_alpha=spec.scale_alpha, lora_dropout=spec.dropout, target_modules=modules)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        adapted[model_name] = modules
    return adapted


CLIP_ROOT = "text_model."  # where CLIP's layers sit in SD checkpoints (transformers 5 builds them without it)


def adapter_layers(learned: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """One model's adapters in peft's saved layout: '<module>.lora_A.weight' (what diffusers writes and loads), text
    encoder modules named as in SD's CLIP ('text_model.encoder.layers.0...'), as other tools' LoRA files name them."""
    layers = {}
    for key, value in learned.items():
        model, name = key.split(".", 1)
        if model == model_name and adapted_name(name) is not None:
            if model == "text_encoder" and not name.startswith(CLIP_ROOT):
                name = CLIP_ROOT + name
            layers[name.replace(f".{ADAPTER_NAME}.", ".")] = value.detach().cpu().contiguous()
    return layers


def adapter_metadata(layers: dict[str, torch.Tensor], spec: LoraSpec) -> dict:
    """The LoRA config diffusers stores beside the weights, so an alpha other than the rank loads as trained. Its
    module names match by suffix, so they are given without CLIP's root and fit either CLIP layout."""
    modules = sorted({k.rsplit(".lora_", 1)[0].removeprefix(CLIP_ROOT) for k in layers})
    return {"r": spec.rank, "lora_alpha": spec.scale_alpha, "lora_dropout": spec.dropout, "target_modules": modules,
            "bias": "none", "init_lora_weights": True, "use_dora": False}


def kohya_layers(layers_by_model: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """The kohya / A1111 layout: 'lora_unet_<module with _>.lora_down.weight', '.lora_up.weight' and '.alpha'
    (the scale is alpha / rank, as peft's)."""
    out: dict[str, torch.Tensor] = {}
    for model_name, layers in layers_by_model.items():
        for key, value in layers.items():
            module, kind = key.rsplit(".lora_", 1)
            prefix = KOHYA_PREFIX[model_name] + module.replace(".", "_")
            out[f"{prefix}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
            out[f"{prefix}.alpha"] = torch.tensor(float(alphas[model_name]))
    return out
