"""Training data of one run: cached VAE latents of augmented images, and the batches drawn from them.

The few instance images are augmented into a fixed number of variants each (`latent_variants`) and encoded
once; the posterior mean and std are kept and every draw samples fresh latent noise, as encoding every step
would. The augmentation itself is therefore a fixed set of variants rather than a fresh draw per step (the
methods' code re-augments every step): more variants come closer, at the cost of encoding them once.
Class-prior images are cached the same way (one variant each).

With aspect-ratio buckets the variants of a bank have several shapes: each is stored padded to the largest
height and width, with its own latent shape beside it, and a batch draws items of one shape only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from personalize.augment import Size, Variant, aspect_bucket, augment, plain
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
    # (N, 2) latent (height, width) of each item when they differ (aspect buckets; the tensors are padded), else None
    shapes: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.mean.shape[0]

    def shape_of(self, i: int) -> tuple[int, int]:
        return tuple(self.shapes[i].tolist()) if self.shapes is not None else tuple(self.mean.shape[-2:])

    def with_shape(self, shape: tuple[int, int]) -> torch.Tensor:
        """Indices of the items of one latent shape."""
        if self.shapes is None:
            return torch.arange(len(self)) if tuple(self.mean.shape[-2:]) == tuple(shape) else torch.zeros(0, dtype=torch.long)
        return torch.nonzero((self.shapes == torch.tensor(shape)).all(1)).flatten()

    def _crop(self, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.shapes is None:
            return t[index]
        shapes = self.shapes[index]
        if not (shapes == shapes[0]).all():
            raise ValueError(f"one batch mixes latent shapes {sorted({tuple(s) for s in shapes.tolist()})}")
        h, w = shapes[0].tolist()
        return t[index][..., :h, :w]

    def sample(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mean, std = self._crop(self.mean, index), self._crop(self.std, index)
        noise = torch.randn(mean.shape, generator=gen)
        return (mean + std * noise) * self.scaling_factor

    def item_masks(self, index: torch.Tensor) -> torch.Tensor | None:
        return self._crop(self.masks, index) if self.masks is not None else None

    def save(self, path: Path) -> None:
        tensors = {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
        if self.masks is not None:
            tensors["masks"] = self.masks.contiguous()
        if self.shapes is not None:
            tensors["shapes"] = self.shapes.contiguous()
        meta = {"captions": json.dumps(self.captions), "scaling_factor": str(self.scaling_factor)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> LatentBank:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        return cls(t["mean"], t["std"], json.loads(meta["captions"]), t.get("masks"), float(meta["scaling_factor"]),
                   t.get("shapes"))

    @classmethod
    def stacked(cls, means: list[torch.Tensor], stds: list[torch.Tensor], captions: list[str],
                masks: list[torch.Tensor] | None, scaling_factor: float) -> LatentBank:
        """One bank from per-item (C, h, w) latents; items of different shapes are zero-padded and their shapes kept."""
        shapes = torch.tensor([list(m.shape[-2:]) for m in means])
        if (shapes == shapes[0]).all():
            return cls(torch.stack(means), torch.stack(stds), captions, torch.stack(masks) if masks else None,
                       scaling_factor)
        h, w = shapes.max(0).values.tolist()

        def pad(items: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([torch.nn.functional.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in items])

        return cls(pad(means), pad(stds), captions, pad(masks) if masks else None, scaling_factor, shapes)


@torch.no_grad()
def encode_variants(vae, variants: list[Variant], device: torch.device, dtype: torch.dtype, batch: int = 8):
    """Per-variant posterior (mean, std) lists, in order; variants of one shape are encoded together."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(variants):
        by_shape.setdefault(tuple(v.pixels.shape), []).append(i)
    means: list[torch.Tensor] = [torch.empty(0)] * len(variants)
    stds: list[torch.Tensor] = [torch.empty(0)] * len(variants)
    for members in by_shape.values():
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            pixels = torch.stack([variants[i].pixels for i in chunk]).to(device, dtype)
            dist = vae.encode(pixels).latent_dist
            for j, i in enumerate(chunk):
                means[i], stds[i] = dist.mean[j].float().cpu(), dist.std[j].float().cpu()
    return means, stds


def vae_scale_of(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def bucket_step(vae, unet) -> int:
    """Pixel multiple a training shape needs: the VAE's factor times every UNet downsampling."""
    return vae_scale_of(vae) * 2 ** (len(unet.config.block_out_channels) - 1)


def training_shapes(images: list[Image.Image], size: int, step: int | None) -> list[Size]:
    """Each photo's training shape: its aspect-ratio bucket when `step` is given, else the size x size square."""
    if step is None:
        return [(size, size)] * len(images)
    return [aspect_bucket(*image.size, size, step) for image in images]


def instance_bank(images: list[Image.Image], preset: str, size: int | list[Size], variants_per_image: int, vae, seed: int,
                  device: torch.device, dtype: torch.dtype, masks: list[Image.Image] | None = None) -> LatentBank:
    """Every photo's augmented variants, encoded. `size` is the square side, or one (width, height) per photo
    (aspect buckets). With `masks` (white = subject), each mask goes through the same augmentation as its photo
    (the same random draws) and becomes the variant's loss mask at latent resolution, multiplied into any mask
    the preset makes itself (Custom Diffusion's pasted box)."""
    vae_scale = vae_scale_of(vae)
    shapes = training_shapes(images, size, None) if isinstance(size, int) else size
    variants = []
    for i, image in enumerate(images):
        for k in range(variants_per_image):
            variant = augment(image, preset, shapes[i], vae_scale, generator(seed, "augment", i, k))
            if masks is not None:
                shape = augment(masks[i].convert("L").resize(image.size).convert("RGB"), preset, shapes[i], vae_scale,
                                generator(seed, "augment", i, k))
                subject = torch.nn.functional.avg_pool2d((shape.pixels[:1] + 1) / 2, vae_scale)
                variant.mask = subject if variant.mask is None else variant.mask * subject
            variants.append(variant)
    means, stds = encode_variants(vae, variants, device, dtype)
    masks_out = None
    if any(v.mask is not None for v in variants):
        masks_out = [v.mask if v.mask is not None else torch.ones(1, *m.shape[-2:]) for v, m in zip(variants, means)]
    return LatentBank.stacked(means, stds, [v.caption_prefix for v in variants], masks_out, vae.config.scaling_factor)


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


def prior_bank(pairs: list[tuple[Image.Image, str]], sizes: int | list[Size], vae, device: torch.device,
               dtype: torch.dtype) -> LatentBank:
    """Class-prior images, centre-cropped to the square side or to each of the instances' bucket shapes."""
    shapes = sorted(set(sizes)) if isinstance(sizes, list) else [(sizes, sizes)]
    variants = [plain(image, shape) for shape in shapes for image, _ in pairs]
    means, stds = encode_variants(vae, variants, device, dtype)
    return LatentBank.stacked(means, stds, [caption for _ in shapes for _, caption in pairs], None,
                              vae.config.scaling_factor)


@dataclass
class Batch:
    latents: torch.Tensor
    prompts: list[str]
    is_prior: torch.Tensor  # (B,) bool
    masks: torch.Tensor | None


class Batcher:
    """Draws training batches: instance variants with the method's prompt, plus class priors when asked."""

    def __init__(self, instances: LatentBank, placeholders: Placeholders, templates: list[str],
                 priors: LatentBank | None = None, prior_mode: str = "concat", captions: list[str | None] | None = None,
                 augmentation_words: bool = True):
        self.instances = instances
        self.priors = priors
        self.placeholders = placeholders
        self.templates = templates
        self.prior_mode = prior_mode
        self.captions = captions  # per instance variant: its photo's caption file, which replaces the templates
        self.augmentation_words = augmentation_words  # the variants' caption prefixes ("a far away ") or none

    def prompt(self, index: int, template: str) -> str:
        caption = self.captions[index] if self.captions else None
        text = caption.replace("{class}", "{super_category}") if caption else template
        prefix = self.instances.captions[index] if self.augmentation_words else ""
        return prefix + self.placeholders.fill(text)

    def draw(self, batch_size: int, gen: torch.Generator, use_prior: bool) -> Batch:
        if not use_prior or self.priors is None:
            n_instance, n_prior = batch_size, 0
        elif self.prior_mode == "concat":
            n_instance, n_prior = batch_size, batch_size
        else:  # mixed: each slot is a class prior with probability 1/2 (Custom Diffusion's dataset)
            n_prior = int((torch.rand(batch_size, generator=gen) < 0.5).sum())
            n_instance = batch_size - n_prior
        idx = self._indices(self.instances, n_instance, gen)
        template_idx = torch.randint(len(self.templates), (n_instance,), generator=gen)
        latents = [self.instances.sample(idx, gen)]
        prompts = [self.prompt(i, self.templates[t]) for i, t in zip(idx.tolist(), template_idx.tolist())]
        masks = self.instances.item_masks(idx)
        if n_prior:
            shape = self.instances.shape_of(int(idx[0])) if n_instance else None
            pidx = self._indices(self.priors, n_prior, gen, shape)
            latents.append(self.priors.sample(pidx, gen))
            prompts += [self.priors.captions[i] for i in pidx.tolist()]
            if masks is not None:
                masks = torch.cat([masks, torch.ones(n_prior, *masks.shape[1:])])
        is_prior = torch.tensor([False] * n_instance + [True] * n_prior)
        return Batch(torch.cat(latents), prompts, is_prior, masks)

    @staticmethod
    def _indices(bank: LatentBank, n: int, gen: torch.Generator, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """`n` random items of one latent shape: `shape`, or that of a first item drawn uniformly (so each bucket is
        drawn as often as it holds items). A bank of one shape draws exactly as it always has."""
        if bank.shapes is None:
            return torch.randint(len(bank), (n,), generator=gen)
        if shape is None:
            shape = bank.shape_of(int(torch.randint(len(bank), (1,), generator=gen)))
        members = bank.with_shape(shape)
        if len(members) == 0:
            raise ValueError(f"no item of latent shape {shape} to draw from")
        return members[torch.randint(len(members), (n,), generator=gen)]
