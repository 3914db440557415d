"""CoRe's embedding rescaling as a stage hook (see personalize/stage_hooks.py)."""

from __future__ import annotations

import torch

from personalize.method_spec import StageSpec
from personalize.tokens import placeholder_embeddings


class NormLock:
    """Embedding rescaling (CoRe Eq. 6, official schedule): after update `start` record the norm of the placeholder
    rows; after updates start+1 .. end rescale them back to it. Outside that window the norm is free.

    The official code takes `torch.norm` of the whole learned embedding, so with several vectors this is one joint
    (Frobenius) norm of all rows together, and every row is scaled by the same factor: the rows' own norms may move
    as long as the joint norm is kept. SDXL's placeholders have rows in two text encoders of different scales: each
    encoder's rows keep their own joint norm.
    """

    def __init__(self, stage: StageSpec, state: dict, rows: list[torch.nn.Parameter]):
        self.rows = rows
        self.window = stage.embedding_norm_lock.window(stage.steps) if stage.embedding_norm_lock else None
        self.norm = None  # (encoders,) tensor: the recorded joint norm of each encoder's rows
        if "norms" in state:
            saved = torch.tensor(state["norms"]).reshape(-1)
            # one value per encoder; a checkpoint with one norm per row (older layout) gives the same joint norm
            self.norm = saved if saved.numel() == len(rows) else saved.norm().reshape(1)

    @staticmethod
    def _joint_norm(rows: torch.Tensor) -> torch.Tensor:
        """(1,): all rows flattened into one vector; for a single row exactly that row's norm."""
        return rows.reshape(1, -1).norm(dim=-1)

    def before_step(self, step: int) -> None:
        pass

    def after_update(self, step: int) -> None:
        if self.window is None:
            return
        with torch.no_grad():
            start, end = self.window
            if step == start:
                self.norm = torch.cat([self._joint_norm(rows).detach().cpu() for rows in self.rows])
            elif start < step <= end and self.norm is not None:
                for rows, norm in zip(self.rows, self.norm):
                    rows.mul_(norm.to(rows.device) / self._joint_norm(rows))

    def state(self) -> dict:
        return {"norms": self.norm.tolist()} if self.norm is not None else {}


def from_stage(ctx, stage: StageSpec, state: dict) -> NormLock | None:
    """A lock for a stage that asks for one and trains the placeholder rows."""
    if stage.embedding_norm_lock is None:
        return None
    rows = [emb.rows for emb in placeholder_embeddings(ctx.components) if emb.rows.requires_grad]
    if not rows:
        return None
    return NormLock(stage, state, rows)
