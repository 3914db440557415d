"""Run outputs in formats other tools load: diffusers and A1111/ComfyUI embeddings, UNet weights.

  learned_embeds.safetensors       {token: (vectors, D)} per subject (diffusers `load_textual_inversion`)
  learned_embeds_2.safetensors     SDXL: the same for the second text encoder (as diffusers' SDXL scripts write it)
  learned_embeds-<k>.safetensors   one file per subject when a concept has several (DisenDiff)
  <concept>.a1111.safetensors      {"emb_params": (vectors, D)}; SDXL: {"clip_l": ..., "clip_g": ...} (A1111 / ComfyUI
                                   embeddings folder)
  unet.safetensors                 only the UNet parameters some stage trained, by state-dict name
  pytorch_lora_weights.safetensors LoRA adapters, diffusers layout (`pipe.load_lora_weights(run_dir)`)
  <concept>.lora.safetensors       the same adapters, kohya layout (A1111 / Forge / ComfyUI loras folder)
  placeholders.json                how to rebuild the tokens (strings, ids order, super-categories)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from personalize.tokens import Placeholders

EMBEDS = "learned_embeds.safetensors"
SECOND_ENCODER = "_2"  # learned_embeds_2*.safetensors: SDXL's second text encoder's rows
UNET = "unet.safetensors"
LORA = "pytorch_lora_weights.safetensors"
PLACEHOLDERS = "placeholders.json"


def save_embeddings(run_dir: Path, concept_id: str, rows: dict[str, torch.Tensor], widths: list[int] | None = None) -> list[Path]:
    """Each subject's learned vectors; with two text encoders (`widths` of each, SDXL) a vector is its rows of both
    joined, and each encoder's part goes to its own file."""
    if not rows:
        return []
    widths = widths or [next(iter(rows.values())).shape[1]]
    parts = [{k: v[:, sum(widths[:i]) : sum(widths[: i + 1])].contiguous() for k, v in rows.items()} for i in range(len(widths))]
    written = []
    for i, part in enumerate(parts):
        name = "learned_embeds" + (SECOND_ENCODER if i else "")
        save_file(part, str(run_dir / f"{name}.safetensors"))
        written.append(run_dir / f"{name}.safetensors")
        if len(rows) > 1:
            for k, (token, value) in enumerate(part.items(), 1):
                save_file({token: value}, str(run_dir / f"{name}-{k}.safetensors"))
                written.append(run_dir / f"{name}-{k}.safetensors")
    for k, token in enumerate(rows, 1):
        suffix = "" if len(rows) == 1 else f"-{k}"
        a1111 = run_dir / f"{concept_id}{suffix}.a1111.safetensors"
        tensors = {"emb_params": parts[0][token]} if len(parts) == 1 else {"clip_l": parts[0][token], "clip_g": parts[1][token]}
        save_file(tensors, str(a1111), metadata={"name": f"{concept_id}{suffix}", "token": token})
        written.append(a1111)
    return written


def save_unet(run_dir: Path, learned: dict[str, torch.Tensor]) -> Path | None:
    """Trained UNet weights under the base model's names (a weight under an adapter is peft's 'base_layer')."""
    from personalize.params import adapted_name

    unet = {k.removeprefix("unet.").replace(".base_layer.", "."): v.detach().cpu().contiguous()
            for k, v in learned.items() if k.startswith("unet.") and adapted_name(k) is None}
    if not unet:
        return None
    save_file(unet, str(run_dir / UNET))
    return run_dir / UNET


def save_lora(run_dir: Path, concept_id: str, learned: dict[str, torch.Tensor], stages) -> list[Path]:
    """The LoRA adapters, in diffusers' layout (with their config, so alpha loads as trained) and kohya's."""
    from diffusers import StableDiffusionPipeline

    from personalize.lora import adapter_layers, adapter_metadata, kohya_layers, lora_layout

    layout = lora_layout(stages)
    layers = {model: adapter_layers(learned, model) for model in layout}
    if not any(layers.values()):
        return []
    meta = {f"{m}_lora_adapter_metadata": adapter_metadata(layers[m], layout[m][0]) for m in layout}
    StableDiffusionPipeline.save_lora_weights(
        run_dir, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
        weight_name=LORA, **meta)
    kohya = run_dir / f"{concept_id}.lora.safetensors"
    save_file(kohya_layers(layers, {m: spec.scale_alpha for m, (spec, _) in layout.items()}), str(kohya),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(next(iter(layout.values()))[0].rank),
                        "ss_network_alpha": str(next(iter(layout.values()))[0].scale_alpha)})
    return [run_dir / LORA, kohya]


def save_placeholders(run_dir: Path, placeholders: Placeholders, subject_phrase: str) -> Path:
    path = run_dir / PLACEHOLDERS
    path.write_text(json.dumps({
        "tokens": placeholders.tokens,
        "strings": placeholders.strings,
        "super_categories": placeholders.super_categories,
        "learned": placeholders.learned,
        "subject": subject_phrase,
    }, indent=1))
    return path


def load_unet_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / UNET
    return load_file(str(path)) if path.is_file() else {}


def load_embeddings(run_dir: Path) -> dict[str, torch.Tensor]:
    """{token: vectors}; for SDXL each vector's rows of both text encoders joined."""
    path = Path(run_dir) / EMBEDS
    if not path.is_file():
        return {}
    rows = load_file(str(path))
    second = Path(run_dir) / EMBEDS.replace(".safetensors", f"{SECOND_ENCODER}.safetensors")
    if second.is_file():
        other = load_file(str(second))
        rows = {token: torch.cat([value, other[token]], dim=1) for token, value in rows.items()}
    return rows
