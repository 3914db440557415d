"""CLIP-T, CLIP-I and DINO scorers: load an encoder once, score batches. Scores are raw cosines.

CLIP: an open_clip model, by `ARCH/PRETRAINED` (e.g. ViT-B-32/openai, downloaded through open_clip) or by a
local folder holding open_clip_config.json + open_clip_model.safetensors. DINO: a transformers ViT, by hub id
(facebook/dino-vits16) or local folder; the feature is the CLS token of the last hidden state (after the final
layer norm), never the pooler, whose weights the DINO checkpoints do not have.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from personalize.errors import ModelUnavailableError

SCALE = "raw cosine"
DEFAULT_CLIP = "ViT-B-32/openai"
DEFAULT_DINO = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pairwise_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all (a_i, b_j) pairs of L2-normalised rows: CLIP-I / DINO."""
    return float((F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean())


def per_row_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of a, its mean cosine to all rows of b."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean(1)


def apply_mask(image: Image.Image, mask: Image.Image | None, fill=(0, 0, 0)) -> Image.Image:
    """Keep the foreground (white in the mask); the rest becomes `fill` (identity metrics on masked images)."""
    if mask is None:
        return image
    background = Image.new("RGB", image.size, fill)
    return Image.composite(image, background, mask.convert("L").resize(image.size))


def _offline_error(name: str, kind: str, flag: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        name, f"the {kind} weights are not cached here and cannot be downloaded",
        f"Pass {flag} PATH: a local folder with the weights ({'open_clip_config.json + open_clip_model.safetensors' if kind == 'CLIP' else 'a transformers ViT: config.json + model.safetensors'}).",
    )


class ClipScorer:
    def __init__(self, name: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        import open_clip

        self.name = name
        self.device = torch.device(device)
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "open_clip_model.safetensors").is_file() or not (path / "open_clip_config.json").is_file():
                raise ModelUnavailableError(name, "the folder lacks open_clip_config.json or open_clip_model.safetensors",
                                            "Save the model with personalize.metrics.save_open_clip (safetensors only).")
            ident = f"local-dir:{path}"
            model, _, preprocess = open_clip.create_model_and_transforms(ident)
            tokenizer = open_clip.get_tokenizer(ident)
        elif name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
            raise ModelUnavailableError(name, "no such folder", "Pass an existing folder written by save_open_clip, "
                                        "or ARCH/TAG from open_clip.list_pretrained().")
        else:
            arch, _, tag = name.partition("/")
            model, preprocess, tokenizer = _hub_clip(open_clip, arch, tag, name)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch: int = 32) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), batch):
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + batch]]).to(self.device)
            feats.append(self.model.encode_image(pixels).float())
        return F.normalize(torch.cat(feats), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str], batch: int = 64) -> torch.Tensor:
        feats = []
        for i in range(0, len(texts), batch):
            tokens = self.tokenizer(list(texts[i : i + batch])).to(self.device)
            feats.append(self.model.encode_text(tokens).float())
        return F.normalize(torch.cat(feats), dim=-1).cpu()


def _hub_clip(open_clip, arch: str, tag: str, name: str):
    """open_clip weights by tag: the local Hugging Face cache (safetensors) first, then a download if the hub answers."""
    from personalize.models import _hub_reachable

    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if not cfg:
        raise ModelUnavailableError(name, f"open_clip has no pretrained tag {tag!r} for {arch!r}",
                                    "Give ARCH/TAG from open_clip.list_pretrained() or a local folder.")
    cached = _cached_safetensors(cfg)
    if cached is not None:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=cached,
                                                                     force_quick_gelu=bool(cfg.get("quick_gelu")))
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise _offline_error(name, "CLIP", "--clip")
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)
    return model, preprocess, open_clip.get_tokenizer(arch)


def _cached_safetensors(cfg: dict) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo = (cfg.get("hf_hub") or "").strip("/")
    if not repo:
        return None
    path = try_to_load_from_cache(repo, "open_clip_model.safetensors")
    return path if isinstance(path, str) else None


class DinoScorer:
    def __init__(self, name: str = DEFAULT_DINO, device: str | torch.device = "cpu"):
        from transformers import ViTModel

        self.name = name
        self.device = torch.device(device)
        path = Path(name).expanduser()
        try:
            if path.is_dir():
                model = ViTModel.from_pretrained(str(path), add_pooling_layer=False, use_safetensors=True)
            else:
                model = _hub_vit(ViTModel, name)
        except OSError as e:
            raise ModelUnavailableError(name, f"loading failed ({e})", "Pass --dino PATH to a local transformers ViT folder.") from None
        self.model = model.to(self.device).eval()
        self.size = int(model.config.image_size)
        self.resize = round(self.size * 256 / 224)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize (bicubic) to 256/224 of the input size, centre-crop, ImageNet normalisation."""
        w, h = image.size
        scale = self.resize / min(w, h)
        image = image.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        return (arr - mean) / std

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch: int = 32) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), batch):
            pixels = torch.stack([self.preprocess(im) for im in images[i : i + batch]]).to(self.device)
            feats.append(self.model(pixel_values=pixels).last_hidden_state[:, 0].float())
        return F.normalize(torch.cat(feats), dim=-1).cpu()


def _hub_vit(vit_class, name: str):
    from personalize.models import _hub_reachable

    try:
        return vit_class.from_pretrained(name, add_pooling_layer=False, local_files_only=True)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise _offline_error(name, "DINO", "--dino")
    return vit_class.from_pretrained(name, add_pooling_layer=False)


def save_open_clip(model, model_cfg: dict, folder: str | Path, preprocess_cfg: dict | None = None) -> Path:
    """Write an open_clip model as a folder ClipScorer (and open_clip's local-dir: schema) loads: safetensors only."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
