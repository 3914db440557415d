"""Checks of a batch's own resources in the driver, before Ray starts or a tracking run is opened: the base model
folder and its weight files, the scorer folders. Each failure is one line naming what, where and the fix; nothing
is created. (Concept images are checked per concept later: a bad concept fails only itself.)"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from personalize.errors import ConfigError
from personalize.models import SUBFOLDERS

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be loaded, read from its header alone (no tensor is read), or None."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if size < 8:
        return f"is cut off ({size} bytes, no header)"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"is cut off or not safetensors (header of {header_len} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "has an unreadable safetensors header (not safetensors, or damaged)"
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    if ends and max(ends) > size - 8 - header_len:
        return f"is cut off: its header promises {max(ends)} bytes of tensors, the file holds {size - 8 - header_len}"
    return None


def model_problems(model: str) -> list[str]:
    """A local diffusers folder: present, a folder, every component there, each weight file readable."""
    local = "://" not in model and (model.startswith(("/", ".", "~")) or Path(model).exists())
    if not local:
        return []  # s3 uris and hub ids are reached where they load
    path = Path(model).expanduser()
    fix = "point model= at a complete diffusers pipeline folder (see `personalize tiny-model`)"
    if not path.exists():
        return [f"model {path}: no such folder; {fix}"]
    if not path.is_dir():
        return [f"model {path}: a file, not a folder; {fix}"]
    problems = [f"model {path}: no {name}/ subfolder; {fix}" for name in SUBFOLDERS if not (path / name).is_dir()]
    for name in ("text_encoder", "vae", "unet"):
        folder = path / name
        if not folder.is_dir():
            continue
        weights = [f for f in sorted(folder.iterdir()) if f.suffix in WEIGHT_SUFFIXES]
        if not weights:
            problems.append(f"model {folder}: no weight file (*.safetensors); {fix}")
        for file in weights:
            problem = _safetensors_problem(file) if file.suffix == ".safetensors" else (
                "is empty (0 bytes)" if file.stat().st_size == 0 else None)
            if problem:
                problems.append(f"model {file} {problem}; copy the model folder again, or {fix}")
    return problems


def scorer_problems(evaluation) -> list[str]:
    """Scorer folders named by path must exist (names without a path are model ids, loaded where they run)."""
    if evaluation is None:
        return []
    problems = []
    for key in ("clip", "dino"):
        value = getattr(evaluation, key)
        if value.startswith(("/", ".", "~")) and not Path(value).expanduser().is_dir():
            problems.append(f"evaluation.{key} {value}: no such folder; point it at the scorer's folder, or set "
                            "evaluation: null to skip evaluation")
    return problems


def check_batch_resources(config, source: str) -> None:
    """Every problem of the batch's own resources at once, as a ConfigError (exit 2, nothing started)."""
    problems = model_problems(config.model) + scorer_problems(config.evaluation)
    if problems:
        raise ConfigError(source, problems)
