"""Content fingerprints of model folders: what identifies a model's weights beyond the path they sit at."""

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
