"""CoRe's embedding rescaling as a stage hook (see personalize/stage_hooks.py)."""

from __future__ import annotations

import torch

from personalize.method_spec import StageSpec
from personalize.tokens import placeholder_embedding


class NormLock:
    """Embedding rescaling (CoRe Eq. 6, official schedule): after update `start` record the norm of the placeholder
    rows; after updates start+1 .. end rescale them back to it. Outside that window the norm is free.

    The official code takes `torch.norm` of the whole learned embedding, so with several vectors this is one joint
    (Frobenius) norm of all rows together, and every row is scaled by the same factor: the rows' own norms may move
    as long as the joint norm is kept.
    """

    def __init__(self, stage: StageSpec, state: dict, rows: torch.nn.Parameter):
        self.rows = rows
        self.window = stage.embedding_norm_lock.window(stage.steps) if stage.embedding_norm_lock else None
        self.norm = None  # (1,) tensor: the recorded joint norm
        if "norms" in state:
            saved = torch.tensor(state["norms"])
            # one value; a checkpoint with one norm per row (older layout) gives the same joint norm combined
            self.norm = saved if saved.numel() == 1 else saved.norm().reshape(1)

    @staticmethod
    def _joint_norm(rows: torch.Tensor) -> torch.Tensor:
        """(1,): all rows flattened into one vector; for a single row exactly that row's norm."""
        return rows.reshape(1, -1).norm(dim=-1)

    def before_step(self, step: int) -> None:
        pass

    def after_update(self, step: int) -> None:
        if self.window is None:
            return
        rows = self.rows
        with torch.no_grad():
            start, end = self.window
            if step == start:
                self.norm = self._joint_norm(rows).detach().cpu()
            elif start < step <= end and self.norm is not None:
                rows.mul_(self.norm.to(rows.device) / self._joint_norm(rows))

    def state(self) -> dict:
        return {"norms": self.norm.tolist()} if self.norm is not None else {}


def from_stage(ctx, stage: StageSpec, state: dict) -> NormLock | None:
    """A lock for a stage that asks for one and trains the placeholder rows."""
    if stage.embedding_norm_lock is None:
        return None
    embedding = placeholder_embedding(ctx.components.text_encoder)
    if embedding is None or not embedding.rows.requires_grad:
        return None
    return NormLock(stage, state, embedding.rows)
