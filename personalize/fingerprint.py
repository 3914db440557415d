"""Content fingerprints: what identifies a model's weights, or a concept's photos, beyond the path they sit at."""

from __future__ import annotations

import hashlib
from pathlib import Path


def model_fingerprint(model_path: Path) -> str:
    """Content fingerprint of a diffusers folder: path, size and first MiB of each weight file."""
    h = hashlib.sha256()
    for f in sorted(model_path.rglob("*.safetensors")) + sorted(model_path.rglob("*.bin")):
        h.update(str(f.relative_to(model_path)).encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as handle:
            h.update(handle.read(1 << 20))
    return h.hexdigest()[:16]


def local_model_fingerprint(model: str) -> str | None:
    """The fingerprint of a model given as a local folder; None for hub ids and uris (named by what they are)."""
    path = Path(model)
    return model_fingerprint(path) if "://" not in model and path.is_dir() else None


def photos_fingerprint(spec, folder_names: bool = False) -> str:
    """Content fingerprint of what a run trains on: its concept's photos and their captions, and its masks when the
    loss is masked to them (the held-out photos and, otherwise, the masks only serve evaluation). Files count by
    their role and name, not by the folder they sit in: photos moved elsewhere are the same photos.
    `folder_names`: the fingerprint that runs finished before it was so carry (each file under its folder's name)."""
    from personalize.images import CAPTION_SUFFIXES, find_masks, list_image_files

    concept = spec.concept
    photos = list_image_files(concept.id, concept.images)
    files = [("photo", p) for p in photos]
    files += [("photo", p) for p in sorted(photos[0].parent.iterdir())
              if p.suffix.lower() in CAPTION_SUFFIXES and not p.name.startswith(".")]
    if spec.masked_loss and concept.masks:  # without a masks folder, training refuses the run
        files += [("mask", p) for p in find_masks(concept.id, concept.masks, [p.name for p in photos])]
    return content_digest([(p.parent.name, p) for _, p in files] if folder_names else files)


def references_fingerprint(concept) -> str | None:
    """Content fingerprint of what identity is scored against: the concept's photos, their masks when it has
    them, and its held-out photos (the ceiling). None when the photos cannot be read (the concept checks report
    that): an evaluation or floor recorded under another fingerprint is scored again."""
    from personalize.errors import ConceptError
    from personalize.images import find_masks, list_image_files

    try:
        photos = list_image_files(concept.id, concept.images)
        files = [("photo", p) for p in photos]
        if concept.masks:
            files += [("mask", p) for p in find_masks(concept.id, concept.masks, [p.name for p in photos])]
        if concept.holdout:
            files += [("holdout", p) for p in list_image_files(concept.id, concept.holdout)]
    except ConceptError:
        return None
    return content_digest(files)


def content_digest(files: list[tuple[str, Path]]) -> str:
    """Digest of (label, file) pairs: each file's label, name and bytes, in order."""
    h = hashlib.sha256()
    for label, path in files:
        h.update(f"{label}/{path.name}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
