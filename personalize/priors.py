"""Class-prior images: generated once per (model, class prompt, seed, count, settings) and shared.

Concepts of the same class (and later batches) reuse the same content-addressed folder. A folder
counts as finished only once its manifest is written; generation goes to a temporary folder that is
renamed into place, so an interrupted run never leaves a half set that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from PIL import Image

from personalize.config import ClassPriorSpec
from personalize.images import load_captioned_folder

MANIFEST = "manifest.json"


def model_fingerprint(model_path: Path) -> str:
    """Content fingerprint of a diffusers folder: size and first MiB of each weight file."""
    h = hashlib.sha256()
    for f in sorted(model_path.rglob("*.safetensors")) + sorted(model_path.rglob("*.bin")):
        h.update(str(f.relative_to(model_path)).encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as handle:
            h.update(handle.read(1 << 20))
    return h.hexdigest()[:16]


def prior_key(fingerprint: str, prompt: str, spec: ClassPriorSpec, seed: int, resolution: int) -> str:
    payload = {
        "model": fingerprint, "prompt": prompt, "count": spec.num_images, "seed": seed, "resolution": resolution,
        "steps": spec.inference_steps, "guidance": spec.guidance_scale, "scheduler": spec.scheduler, "eta": spec.eta,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_root() -> Path:
    return Path(os.environ.get("PERSONALIZE_CACHE", Path.home() / ".cache" / "personalize")) / "class_priors"


def read_prior_folder(folder: Path) -> list[tuple[Image.Image, str]]:
    manifest = json.loads((folder / MANIFEST).read_text())
    return [(Image.open(folder / item["file"]).convert("RGB"), item["caption"]) for item in manifest["images"]]


def prior_prompt(spec: ClassPriorSpec, categories: list[str]) -> str:
    classes = " and ".join(f"a {c}" for c in categories)
    return spec.prompt.format(super_category=categories[0], classes=classes)


def class_prior_images(components, spec: ClassPriorSpec, categories: list[str], seed: int, resolution: int,
                       cache_root: Path | None = None, progress: bool = True) -> tuple[list[tuple[Image.Image, str]], Path]:
    """(image, caption) pairs for the class prior, and the folder they live in."""
    prompt = prior_prompt(spec, categories)
    if spec.folder:
        return load_captioned_folder(spec.folder, prompt), Path(spec.folder)
    root = Path(cache_root) if cache_root else default_cache_root()
    folder = root / prior_key(model_fingerprint(components.path), prompt, spec, seed, resolution)
    if not (folder / MANIFEST).is_file():
        generate_prior_folder(components, spec, prompt, seed, resolution, folder, progress)
    return read_prior_folder(folder), folder


def generate_prior_folder(components, spec: ClassPriorSpec, prompt: str, seed: int, resolution: int, folder: Path,
                          progress: bool) -> None:
    from personalize.sampling import build_pipeline, generate

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pipe = build_pipeline(components, spec.scheduler)
    seeds = [seed * 100_003 + i for i in range(spec.num_images)]
    images = generate(pipe, [prompt] * len(seeds), seeds, resolution, spec.inference_steps, spec.guidance_scale,
                      eta=spec.eta, progress=progress)
    items = []
    for i, image in enumerate(images):
        name = f"{i:05d}.png"
        image.save(tmp / name)
        items.append({"file": name, "caption": prompt, "seed": seeds[i]})
    (tmp / MANIFEST).write_text(json.dumps({"prompt": prompt, "images": items}, indent=1))
    try:
        tmp.rename(folder)
    except OSError:  # another run finished the same set first: keep theirs
        if not (folder / MANIFEST).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
