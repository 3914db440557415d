"""Checkpoints: learned state and the cursor, never the frozen base model, never pickle.

A checkpoint folder holds:
  learned.safetensors     every parameter trained so far ('unet.<name>', 'text_encoder.<name>')
  optimizer.safetensors   AdamW moments by parameter name (mid-stage checkpoints only)
  hooks.safetensors       tensors stage hooks keep, e.g. an EMA's shadow (mid-stage checkpoints only)
  cursor.json             stage index, optimizer steps done in it, config hash, seed, stage state, photos
Randomness is derived from (seed, stage, step), so the cursor is all the RNG state a resume needs.
Folders are written under a temporary name and renamed into place: a crash never leaves a torn one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"


@dataclass
class Cursor:
    stage_index: int
    step: int
    config_hash: str
    seed: int
    stage_state: dict = field(default_factory=dict)  # e.g. the norm recorded by an embedding norm lock
    photos: str | None = None  # the fingerprint of the photos trained on (personalize/fingerprint.py)

    @property
    def key(self) -> tuple[int, int]:
        return self.stage_index, self.step


@dataclass
class Checkpoint:
    path: Path
    cursor: Cursor
    learned: dict[str, torch.Tensor]
    optimizer: dict | None
    hook_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / CHECKPOINTS / f"stage-{index:02d}-{name}"


def _atomic_dir(final: Path, write) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state keyed by parameter name, plus its JSON-able hyper-parameters."""
    tensors, groups = {}, []
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": [names[i] for i in group["params"]]})
    for index, values in state["state"].items():
        for key, value in values.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{names[index]}::{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": groups}


def restore_optimizer(optimizer: torch.optim.Optimizer, names: list[str], saved: dict) -> None:
    """Load moments saved by name into an optimizer built over the same named parameters, in order."""
    tensors, meta = saved["tensors"], saved["meta"]
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field_name = key.rsplit("::", 1)
        if name not in index:
            raise ValueError(f"optimizer state for unknown parameter {name}")
        state.setdefault(index[name], {})[field_name] = value
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    device = optimizer.param_groups[0]["params"][0].device
    for s in state.values():
        for k, v in s.items():
            s[k] = v if k == "step" else v.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save(directory: Path, cursor: Cursor, learned: dict[str, torch.Tensor],
         optimizer: tuple[dict[str, torch.Tensor], dict] | None = None, hook_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in learned.items()}, str(tmp / "learned.safetensors"))
        if hook_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in hook_tensors.items()}, str(tmp / "hooks.safetensors"))
        if optimizer is not None:
            save_file(optimizer[0], str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(optimizer[1]))
        (tmp / "cursor.json").write_text(json.dumps(asdict(cursor), indent=1))

    return _atomic_dir(directory, write)


def load(directory: Path) -> Checkpoint:
    cursor = Cursor(**json.loads((directory / "cursor.json").read_text()))
    learned = load_file(str(directory / "learned.safetensors"))
    optimizer = None
    if (directory / "optimizer.safetensors").is_file():
        optimizer = {
            "tensors": load_file(str(directory / "optimizer.safetensors")),
            "meta": json.loads((directory / "optimizer.json").read_text()),
        }
    hooks = load_file(str(directory / "hooks.safetensors")) if (directory / "hooks.safetensors").is_file() else {}
    return Checkpoint(directory, cursor, learned, optimizer, hooks)


def latest_cursor(run_dir: Path) -> tuple[Cursor, Path] | None:
    """The cursor and folder of a run's most advanced complete checkpoint (stage ends and the mid-stage one)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    best: tuple[Cursor, Path] | None = None
    for d in root.iterdir():
        if d.suffix in (".tmp", ".old") or not (d / "cursor.json").is_file():
            continue
        cursor = Cursor(**json.loads((d / "cursor.json").read_text()))
        if best is None or cursor.key > best[0].key:
            best = (cursor, d)
    return best


def latest(run_dir: Path) -> Checkpoint | None:
    """The most advanced complete checkpoint of a run, loaded."""
    found = latest_cursor(run_dir)
    return load(found[1]) if found else None


def apply_learned(models: dict[str, torch.nn.Module], learned: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the matching parameters ('<model>.<parameter name>')."""
    with torch.no_grad():
        for key, value in learned.items():
            model_name, name = key.split(".", 1)
            param = models[model_name].get_parameter(name)
            param.copy_(value.to(param.device, param.dtype))


def discard_latest(run_dir: Path) -> None:
    """Drop the mid-stage checkpoint once a later stage-end checkpoint supersedes it."""
    shutil.rmtree(run_dir / CHECKPOINTS / LATEST, ignore_errors=True)
