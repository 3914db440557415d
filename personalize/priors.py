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
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from personalize.fingerprint import model_fingerprint
from personalize.images import load_captioned_folder
from personalize.method_spec import ClassPriorSpec

MANIFEST = "manifest.json"


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


@dataclass(frozen=True)
class PriorRequest:
    """One class-prior set: where it lives, what to generate, with which seeds."""

    folder: Path
    prompt: str
    seeds: tuple[int, ...]
    spec: ClassPriorSpec
    resolution: int

    @property
    def parts(self) -> Path:
        """Where images accumulate until the set is complete (several workers may fill it)."""
        return self.folder.with_name(self.folder.name + ".parts")

    @property
    def complete(self) -> bool:
        return (self.folder / MANIFEST).is_file()


def prior_request(model_path: Path, spec: ClassPriorSpec, categories: list[str], seed: int, resolution: int,
                  cache_root: Path | None = None) -> PriorRequest:
    prompt = prior_prompt(spec, categories)
    root = Path(cache_root) if cache_root else default_cache_root()
    folder = root / prior_key(model_fingerprint(model_path), prompt, spec, seed, resolution)
    return PriorRequest(folder, prompt, tuple(seed * 100_003 + i for i in range(spec.num_images)), spec, resolution)


def class_prior_images(components, spec: ClassPriorSpec, categories: list[str], seed: int, resolution: int,
                       cache_root: Path | None = None, progress: bool = True) -> tuple[list[tuple[Image.Image, str]], Path]:
    """(image, caption) pairs for the class prior, and the folder they live in."""
    if spec.folder:
        return load_captioned_folder(spec.folder, prior_prompt(spec, categories)), Path(spec.folder)
    request = prior_request(components.path, spec, categories, seed, resolution, cache_root)
    if not request.complete:
        generate_prior_images(components, request, range(len(request.seeds)), progress)
        finalize_prior_folder(request)
    return read_prior_folder(request.folder), request.folder


def generate_prior_images(components, request: PriorRequest, indices, progress: bool = False) -> list[Path]:
    """Generate the images of `request` at `indices` into its parts folder (skips those already there)."""
    from personalize.sampling import build_pipeline, generate

    request.parts.mkdir(parents=True, exist_ok=True)
    todo = [i for i in indices if not (request.parts / f"{i:05d}.png").is_file()]
    if todo:
        pipe = build_pipeline(components, request.spec.scheduler)
        images = generate(pipe, [request.prompt] * len(todo), [request.seeds[i] for i in todo], request.resolution,
                          request.spec.inference_steps, request.spec.guidance_scale, eta=request.spec.eta, progress=progress)
        for i, image in zip(todo, images):
            tmp = request.parts / f".{i:05d}.png"
            image.save(tmp, format="PNG")
            tmp.rename(request.parts / f"{i:05d}.png")
    return [request.parts / f"{i:05d}.png" for i in indices]


def finalize_prior_folder(request: PriorRequest) -> None:
    """Once every image is there: write the manifest and move the set into place (atomically)."""
    names = [f"{i:05d}.png" for i in range(len(request.seeds))]
    missing = [n for n in names if not (request.parts / n).is_file()]
    if missing:
        raise RuntimeError(f"class-prior set {request.folder.name} is incomplete: {len(missing)} images missing")
    items = [{"file": n, "caption": request.prompt, "seed": s} for n, s in zip(names, request.seeds)]
    (request.parts / MANIFEST).write_text(json.dumps({"prompt": request.prompt, "images": items}, indent=1))
    try:
        request.parts.rename(request.folder)
    except OSError:  # another run finished the same set first: keep theirs
        if not request.complete:
            raise
        shutil.rmtree(request.parts, ignore_errors=True)
