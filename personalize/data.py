"""Training data of one run: cached VAE latents of augmented images, and the batches drawn from them.

The few instance images are augmented into a fixed number of variants each (`latent_variants`) and encoded
once; the posterior mean and std are kept and every draw samples fresh latent noise, as encoding every step
would. The augmentation itself is therefore a fixed set of variants rather than a fresh draw per step (the
methods' code re-augments every step): more variants come closer, at the cost of encoding them once.
Class-prior images are cached the same way (one variant each).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from personalize.augment import Variant, augment, plain
from personalize.tokens import Placeholders


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from any tuple of values (not Python's salted hash)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


@dataclass
class LatentBank:
    mean: torch.Tensor  # (N, C, h, w), unscaled posterior mean
    std: torch.Tensor
    captions: list[str]  # per item: a caption prefix (instances) or the full caption (class priors)
    masks: torch.Tensor | None = None  # (N, 1, h, w), None = all ones
    scaling_factor: float = 0.18215

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean[index].shape, generator=gen)
        return (self.mean[index] + self.std[index] * noise) * self.scaling_factor

    def save(self, path: Path) -> None:
        tensors = {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
        if self.masks is not None:
            tensors["masks"] = self.masks.contiguous()
        meta = {"captions": json.dumps(self.captions), "scaling_factor": str(self.scaling_factor)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> LatentBank:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        return cls(t["mean"], t["std"], json.loads(meta["captions"]), t.get("masks"), float(meta["scaling_factor"]))


@torch.no_grad()
def encode_variants(vae, variants: list[Variant], device: torch.device, dtype: torch.dtype, batch: int = 8):
    means, stds = [], []
    for i in range(0, len(variants), batch):
        pixels = torch.stack([v.pixels for v in variants[i : i + batch]]).to(device, dtype)
        dist = vae.encode(pixels).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def instance_bank(images: list[Image.Image], preset: str, size: int, variants_per_image: int, vae, seed: int,
                  device: torch.device, dtype: torch.dtype, masks: list[Image.Image] | None = None) -> LatentBank:
    """Every photo's augmented variants, encoded. With `masks` (white = subject), each mask goes through the same
    augmentation as its photo (the same random draws) and becomes the variant's loss mask at latent resolution,
    multiplied into any mask the preset makes itself (Custom Diffusion's pasted box)."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    variants = []
    for i, image in enumerate(images):
        for k in range(variants_per_image):
            variant = augment(image, preset, size, vae_scale, generator(seed, "augment", i, k))
            if masks is not None:
                shape = augment(masks[i].convert("L").resize(image.size).convert("RGB"), preset, size, vae_scale,
                                generator(seed, "augment", i, k))
                subject = torch.nn.functional.avg_pool2d((shape.pixels[:1] + 1) / 2, vae_scale)
                variant.mask = subject if variant.mask is None else variant.mask * subject
            variants.append(variant)
    mean, std = encode_variants(vae, variants, device, dtype)
    masks_out = None
    if any(v.mask is not None for v in variants):
        ones = torch.ones(1, size // vae_scale, size // vae_scale)
        masks_out = torch.stack([v.mask if v.mask is not None else ones for v in variants])
    return LatentBank(mean, std, [v.caption_prefix for v in variants], masks_out, vae.config.scaling_factor)


def bank_key(model_fingerprint: str, image_files: list[Path], preset: str, size: int, variants: int, seed: int) -> str:
    """Content key of an instance bank: the model, the images' bytes and the augmentation settings."""
    h = hashlib.sha256(json.dumps([model_fingerprint, preset, size, variants, seed]).encode())
    for f in image_files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:24]


def cached_bank_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.safetensors"


def cached_instance_bank(cache_dir: Path | None, key: str, build) -> LatentBank:
    """Load the bank stored under `key`, or build it (and store it, written then renamed into place)."""
    if cache_dir is None:
        return build()
    path = cached_bank_path(cache_dir, key)
    if path.is_file():
        return LatentBank.load(path)
    bank = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(bank)}")
    bank.save(tmp)
    tmp.rename(path)
    return bank


def prior_bank(pairs: list[tuple[Image.Image, str]], size: int, vae, device: torch.device, dtype: torch.dtype) -> LatentBank:
    mean, std = encode_variants(vae, [plain(image, size) for image, _ in pairs], device, dtype)
    return LatentBank(mean, std, [caption for _, caption in pairs], None, vae.config.scaling_factor)


@dataclass
class Batch:
    latents: torch.Tensor
    prompts: list[str]
    is_prior: torch.Tensor  # (B,) bool
    masks: torch.Tensor | None


class Batcher:
    """Draws training batches: instance variants with the method's prompt, plus class priors when asked."""

    def __init__(self, instances: LatentBank, placeholders: Placeholders, templates: list[str],
                 priors: LatentBank | None = None, prior_mode: str = "concat", captions: list[str | None] | None = None):
        self.instances = instances
        self.priors = priors
        self.placeholders = placeholders
        self.templates = templates
        self.prior_mode = prior_mode
        self.captions = captions  # per instance variant: its photo's caption file, which replaces the templates

    def prompt(self, index: int, template: str) -> str:
        caption = self.captions[index] if self.captions else None
        text = caption.replace("{class}", "{super_category}") if caption else template
        return self.instances.captions[index] + self.placeholders.fill(text)

    def draw(self, batch_size: int, gen: torch.Generator, use_prior: bool) -> Batch:
        if not use_prior or self.priors is None:
            n_instance, n_prior = batch_size, 0
        elif self.prior_mode == "concat":
            n_instance, n_prior = batch_size, batch_size
        else:  # mixed: each slot is a class prior with probability 1/2 (Custom Diffusion's dataset)
            n_prior = int((torch.rand(batch_size, generator=gen) < 0.5).sum())
            n_instance = batch_size - n_prior
        idx = torch.randint(len(self.instances), (n_instance,), generator=gen)
        template_idx = torch.randint(len(self.templates), (n_instance,), generator=gen)
        latents = [self.instances.sample(idx, gen)]
        prompts = [self.prompt(i, self.templates[t]) for i, t in zip(idx.tolist(), template_idx.tolist())]
        masks = self.instances.masks[idx] if self.instances.masks is not None else None
        if n_prior:
            pidx = torch.randint(len(self.priors), (n_prior,), generator=gen)
            latents.append(self.priors.sample(pidx, gen))
            prompts += [self.priors.captions[i] for i in pidx.tolist()]
            if masks is not None:
                masks = torch.cat([masks, torch.ones(n_prior, *masks.shape[1:])])
        is_prior = torch.tensor([False] * n_instance + [True] * n_prior)
        return Batch(torch.cat(latents), prompts, is_prior, masks)
