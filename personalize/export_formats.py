"""`personalize export RUN --format F`: a finished run's learned state in the layout another tool loads.

  diffusers  learned_embeds*.safetensors (`pipe.load_textual_inversion`), pytorch_lora_weights.safetensors
             (`pipe.load_lora_weights`), pytorch_custom_diffusion_weights.safetensors for cross-attention k/v (and
             q/out) runs (`pipe.unet.load_attn_procs`); LOADING.md says which calls, in which order
  kohya      <concept>.lora.safetensors (A1111 / Forge / ComfyUI `models/Lora`) and <concept>*.a1111.safetensors
             (their `embeddings` folder)
  a1111      the embeddings only
  pipeline   a whole diffusers pipeline folder, learned tokens in its tokenizer(s) and text encoder(s), trained UNet
             weights and LoRA merged: `StableDiffusionPipeline.from_pretrained(folder)` (SDXL: `StableDiffusionXLPipeline`)

A run whose UNet training is neither LoRA nor cross-attention only (DreamBooth's whole UNet) has no smaller
diffusers form than its merged pipeline; the diffusers export says so and points at `--format pipeline`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from personalize.errors import RunStateError
from personalize.export import LORA, load_unet_weights

FORMATS = ("diffusers", "kohya", "a1111", "pipeline")
CUSTOM_DIFFUSION = "pytorch_custom_diffusion_weights.safetensors"
CROSS_ATTENTION = re.compile(r"^(.*\.attn2)\.(to_k|to_v|to_q|to_out\.0)\.(weight|bias)$")


def export_run(run_dir: Path, fmt: str, out: Path) -> list[Path]:
    """Write the run's `fmt` export into `out` (created; an existing non-empty folder is refused)."""
    from personalize.run_folder import finished_spec

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    run_dir, out = Path(run_dir), Path(out)
    spec = finished_spec(run_dir)
    if out.exists() and any(out.iterdir()):
        raise RunStateError(f"{out} is not empty; give --out a new folder (an export never overwrites files)")
    out.mkdir(parents=True, exist_ok=True)
    writer = {"diffusers": _diffusers, "kohya": _kohya, "a1111": _a1111, "pipeline": _pipeline}[fmt]
    return writer(run_dir, spec.concept.id, out)


def _copy(run_dir: Path, names: list[str], out: Path) -> list[Path]:
    written = []
    for name in names:
        shutil.copy2(run_dir / name, out / name)
        written.append(out / name)
    return written


def _embedding_files(run_dir: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in run_dir.glob(pattern))


def _a1111(run_dir: Path, concept_id: str, out: Path) -> list[Path]:
    return _copy(run_dir, _embedding_files(run_dir, "*.a1111.safetensors"), out)


def _kohya(run_dir: Path, concept_id: str, out: Path) -> list[Path]:
    return _copy(run_dir, _embedding_files(run_dir, "*.lora.safetensors") + _embedding_files(run_dir, "*.a1111.safetensors"), out)


def custom_diffusion_layers(unet_weights: dict[str, torch.Tensor], processors: list[str]) -> dict[str, torch.Tensor] | None:
    """Cross-attention weights as diffusers' Custom Diffusion attention processors hold them
    ('...attn2.processor.to_k_custom_diffusion.weight'), and an empty entry for every other attention processor of
    the UNet (`processors`, e.g. '...attn1.processor'), as diffusers' own saver writes them; None if the run trained
    anything else in the UNet."""
    layers = {}
    for key, value in unet_weights.items():
        found = CROSS_ATTENTION.match(key)
        if found is None:
            return None
        layer, proj, kind = found.groups()
        layers[f"{layer}.processor.{proj.removesuffix('.0')}_custom_diffusion{'.0' if proj == 'to_out.0' else ''}.{kind}"] = value
    kinds = {k.split(".processor.", 1)[1].split("_custom", 1)[0] for k in layers}
    # diffusers' processor trains k and v together, q and out together: a run must match one of its two shapes
    if kinds not in ({"to_k", "to_v"}, {"to_k", "to_v", "to_q", "to_out"}):
        return None
    trained = {k.split(".processor.", 1)[0] + ".processor" for k in layers}
    return layers | {name: torch.empty(0) for name in processors if name not in trained}


def _diffusers(run_dir: Path, concept_id: str, out: Path) -> list[Path]:
    written = _copy(run_dir, _embedding_files(run_dir, "learned_embeds*.safetensors"), out)
    sdxl = (run_dir / "learned_embeds_2.safetensors").is_file()
    steps = []
    for path in written:
        per_subject = [p for p in written if p.name.startswith(path.name.removesuffix(".safetensors") + "-")]
        if per_subject:
            continue  # the per-subject files hold the same rows
        if not sdxl:
            steps.append(f'pipe.load_textual_inversion("{path.name}")')
            continue
        second = "_2" in path.name  # SDXL: each encoder's rows go to that encoder, under the same token
        encoder = "pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" if second else "pipe.text_encoder, tokenizer=pipe.tokenizer"
        token = next(iter(load_file(str(path))))
        steps.append(f'pipe.load_textual_inversion("{path.name}", token="{token}", text_encoder={encoder})')
    unet = load_unet_weights(run_dir)
    if unet:
        layers = custom_diffusion_layers(unet, _attention_processors(run_dir))
        if layers is None:
            raise RunStateError(f"{run_dir} trained UNet weights beyond cross-attention (e.g. {sorted(unet)[0]}): their "
                                "diffusers form is the whole pipeline; export it with --format pipeline")
        save_file({k: v.contiguous() for k, v in layers.items()}, str(out / CUSTOM_DIFFUSION))
        written.append(out / CUSTOM_DIFFUSION)
        # diffusers (0.42) sets the loaded processors only when it is handed the pipeline
        steps.append(f'pipe.unet.load_attn_procs(".", weight_name="{CUSTOM_DIFFUSION}", _pipeline=pipe)')
    if (run_dir / LORA).is_file():
        written += _copy(run_dir, [LORA], out)
        steps.append(f'pipe.load_lora_weights(".", weight_name="{LORA}")')
    if not steps:
        raise RunStateError(f"{run_dir} learned nothing a diffusers loader takes")
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    guide = out / "LOADING.md"
    guide.write_text("# Loading this export with diffusers\n\nRun from this folder, on the base model the run was trained on:\n\n"
                     f"```python\nfrom diffusers import {pipeline}\n\npipe = {pipeline}.from_pretrained(BASE_MODEL)\n"
                     + "\n".join(steps) + "\n```\n")
    return written + [guide]


def _attention_processors(run_dir: Path) -> list[str]:
    """The attention processor names of the run's base UNet (built from its config with empty weights: nothing is
    read or allocated)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from personalize.models import resolve_model_path
    from personalize.run_folder import finished_spec

    path = resolve_model_path(finished_spec(run_dir).model)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path, subfolder="unet"))
    return list(unet.attn_processors)


def _pipeline(run_dir: Path, concept_id: str, out: Path) -> list[Path]:
    """The run applied to its base model and saved whole: tokens in the vocabulary, rows in a plain embedding table,
    trained weights and LoRA merged into the UNet (and text encoder)."""
    from personalize.sampling import LoadedRun, build_pipeline
    from personalize.tokens import placeholder_embedding

    run = LoadedRun(run_dir, device="cpu")
    comps = run.components
    pipe = build_pipeline(comps, run.spec.method.evaluation.scheduler)
    if any(hasattr(m, "peft_config") for m in comps.models.values()):
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    for encoder in comps.text_models.values():
        emb = placeholder_embedding(encoder)
        if emb is not None:  # a plain table with the learned rows appended, as `load_textual_inversion` would leave it
            table = torch.nn.Embedding(emb.base_vocab + emb.rows.shape[0], emb.rows.shape[1])
            table.weight.data.copy_(emb.weight.detach())
            encoder.set_input_embeddings(table)
            encoder.config.vocab_size = table.num_embeddings
    pipe.save_pretrained(out, safe_serialization=True)
    return sorted(p for p in out.rglob("*") if p.is_file())
