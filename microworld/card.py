"""Model card of the micro world's models: how they were trained (from training.json), what they can do
(zero-shot accuracy, prompt following, identity retrieval, measured now), and a sample grid.

    python -m microworld.card --models models/microworld
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from microworld.checks import (
    identity_retrieval,
    pattern_colour_accuracy,
    pattern_colour_following,
    prompt_following,
    shape_through_vae,
    zero_shot_accuracy,
)
from personalize.metrics import ClipScorer, DinoScorer
from personalize.sampling import generate, image_grid

GRID_PROMPTS = [
    "a photo of a red star on the beach", "a photo of a blue striped square in the snow", "a photo of a yellow heart at night",
    "a photo of a green and yellow dotted circle on the grass", "a photo of a purple and orange checked triangle on a table",
    "a photo of an orange hexagon in the water", "a sketch of a pink cross", "a blurry photo of a brown diamond",
]


def load_pipeline(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SHAPE_PHOTOS = 120  # fresh photos whose shape the world CLIP reads, before and after the VAE


@torch.no_grad()
def reconstruction_mse(vae, count: int = 256) -> float:
    """The VAE's reconstruction error on fresh renders (a seed the training set never used), pixels in [-1, 1]."""
    from microworld.data import render_set, to_tensor

    pixels = to_tensor(render_set(count, seed=999)[0])
    return float(torch.nn.functional.mse_loss(vae.decode(vae.encode(pixels).latent_dist.mean).sample, pixels))


def sizes(folder: Path) -> dict[str, float]:
    return {p.parent.name + "/" + p.name: round(p.stat().st_size / 1e6, 2) for p in sorted(folder.rglob("*.safetensors"))}


def vae_origin(record: dict) -> str:
    return f" (reused from {record['reused_from']})" if record.get("reused_from") else ""


def continuations(record: dict) -> list[str]:
    """Lines saying which parts continued an earlier run's weights rather than starting from scratch."""
    parts = {"base": "The text encoder and UNet continue", "clip": "The world CLIP continues"}
    lines = [f"{name} `{record[part]['continued_from']}` (the earlier run's weights, trained further on this "
             "world's pictures)." for part, name in parts.items() if record.get(part, {}).get("continued_from")]
    return ["", *lines] if lines else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models/microworld")
    args = parser.parse_args()
    root = Path(args.models)
    record = json.loads((root / "training.json").read_text())
    torch.manual_seed(0)
    pipe = load_pipeline(root / "model")
    clip, identity = ClipScorer(str(root / "clip")), DinoScorer(str(root / "identity"))
    seeds = [0, 1, 2, 3]
    images = generate(pipe, [p for p in GRID_PROMPTS for _ in seeds], seeds * len(GRID_PROMPTS), 64, steps=50, guidance_scale=5.0)
    image_grid(images, len(seeds), GRID_PROMPTS).resize((len(seeds) * 128, len(GRID_PROMPTS) * (128 + 24))).save(root / "samples.png")
    zero_shot = zero_shot_accuracy(clip)
    following, _ = prompt_following(pipe, clip, per_colour=4)
    following["pattern_colour"] = pattern_colour_following(pipe, clip, count=64)
    zero_shot["shape_through_vae"] = shape_through_vae(pipe.vae, clip, count=SHAPE_PHOTOS)
    zero_shot["pattern_colour"] = pattern_colour_accuracy(clip)
    retrieval = {"identity encoder": identity_retrieval(identity), "world CLIP": identity_retrieval(clip)}
    measured = {"vae_reconstruction_mse": round(reconstruction_mse(pipe.vae), 5), "zero_shot": zero_shot, "prompt_following": following, "identity_retrieval": retrieval, "files_mb": sizes(root)}
    (root / "measurements.json").write_text(json.dumps(measured, indent=1))
    base, vae = record.get("base", {}), record.get("vae", {})
    through_vae = zero_shot["shape_through_vae"]
    total = sum(v for k, v in measured["files_mb"].items() if k.split("/")[0] in ("unet", "vae", "text_encoder"))
    lines = [
        "# Micro-world models",
        "",
        "Trained by this project on procedurally rendered pictures (`microworld/world.py`: 8 shapes, 8",
        "colours, 4 patterns, 6 scenes, 4 styles, 64x64), so that personalization quality can be measured offline.",
        "",
        "Made by these runs (each part's record in `training.json` names its run):",
        "",
        *[f"- `{command}`: {run['device']}, {run['wall_minutes']} min" for command, run in record.get("runs", {}).items()],
        *continuations(record),
        "",
        f"Data: {base.get('data', {}).get('images')} rendered pictures, seed {base.get('data', {}).get('seed')}; training captions drop the",
        "colour (10 %), pattern (20 %) or scene (15 %) so that short prompts work; 10 % empty captions for guidance.",
        "Patterns are white (40 %) or in a second colour (\"a red and blue striped star\"); no training picture has a",
        "mark (ring or eyes): those belong to the held-out concepts only.",
        "",
        "## model/ (a Stable Diffusion pipeline in diffusers format)",
        "",
        "| part | what | training |",
        "|---|---|---|",
        f"| vae | AutoencoderKL, x4 downsampling to 16x16x8 latents | {vae.get('steps')} steps, batch {vae.get('batch')}, "
        f"L1 + MSE + 1e-6 KL; reconstruction MSE on fresh renders {measured['vae_reconstruction_mse']}, scaling factor "
        f"{pipe.vae.config.scaling_factor:.4f}{vae_origin(vae)} |",
        f"| text_encoder | CLIPTextModel, real 49,408-token CLIP tokenizer, {base.get('text_encoder_params')} parameters | "
        "trained jointly with the UNet |",
        f"| unet | UNet2DConditionModel, cross-attention at 16x16 and 8x8, {base.get('unet_params')} parameters | "
        f"{base.get('steps')} steps, batch {base.get('batch')}, {base.get('prediction_type', 'epsilon')} objective, lr {base.get('lr')} "
        f"cosine, EMA {base.get('ema_decay')}, final loss (running mean) {base.get('final_loss_ema')} |",
        "",
        f"Weights are stored in fp16 ({total:.1f} MB for unet + vae + text encoder) and load in fp32 with a plain",
        "`StableDiffusionPipeline.from_pretrained(\"models/microworld/model\")`.",
        "",
        f"Prompt following (DDIM 25 steps, guidance 5, {following['images']} prompts over all 8 colours), judged by the world",
        f"CLIP: **colour {following['colour']:.0%}**, scene {following['scene']:.0%}, shape {following['shape']:.0%} (chance 12.5 % /",
        f"16.7 % / 12.5 %; the world CLIP reads the shape of {SHAPE_PHOTOS} fresh photos {through_vae['photos']:.0%} of the time and of the",
        f"VAE's reconstructions of them {through_vae['reconstructions']:.0%}, so what the shape score lacks is the UNet's). Two-colour prompts",
        "(\"a photo of a yellow and purple striped star ...\", 64 prompts): the pattern in the prompted second colour",
        f"{following['pattern_colour']:.0%} (chance 14 %, judged among the 7 colours other than the body's).",
        "",
        "![samples](samples.png)",
        "",
        "## clip/ (open_clip, loads with `ClipScorer(\"models/microworld/clip\")`)",
        "",
        f"ViT vision tower (64 px, patch 8) and text tower on the same tokenizer; contrastive training for "
        f"{record.get('clip', {}).get('steps')} steps at batch {record.get('clip', {}).get('batch')}, final loss "
        f"{record.get('clip', {}).get('final_loss')}.",
        f"Zero-shot accuracy on 240 fresh photos: **colour {zero_shot['colour']:.0%}, shape {zero_shot['shape']:.0%}, "
        f"scene {zero_shot['scene']:.0%}**; the pattern's second colour on 120 two-colour photos {zero_shot['pattern_colour']:.0%}.",
        "",
        "## identity/ (a transformers ViT, loads with `DinoScorer(\"models/microworld/identity\")`)",
        "",
        "A second, independent identity measure: a small ViT trained self-supervised by instance discrimination",
        "(two photos of the same object in different poses and scenes are a positive pair, NT-Xent, temperature 0.1),",
        f"on objects with any colour pair, pattern and mark; {record.get('identity', {}).get('steps')} steps at batch "
        f"{record.get('identity', {}).get('batch')}, final loss {record.get('identity', {}).get('final_loss')}. It plays",
        "DINO's role: the CLS token of the last hidden state.",
        "",
        f"Identity retrieval of the 8 held-out concepts (fresh photos matched to reference photos): identity encoder "
        f"**{retrieval['identity encoder']:.0%}**, world CLIP {retrieval['world CLIP']:.0%} (chance 12.5 %).",
        "",
    ]
    (root / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
