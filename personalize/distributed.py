"""Data parallelism without wrapping models: when torch.distributed is initialised (e.g. by Ray Train with
several workers), every rank draws its own batches, gradients of the trainable parameters are averaged after
backward, and only rank 0 writes files. Equivalent to DDP, and works with a trainable set that changes per stage."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def average_gradients(params) -> None:
    rank, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= size


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
