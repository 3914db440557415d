"""Rendered training sets, made in parallel and kept as uint8 arrays."""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from microworld.world import caption, random_scene, render, training_caption


def _chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str], list[str]]:
    start, count, seed = args
    images, captions, full = [], [], []
    for i in range(start, start + count):
        scene = random_scene(seed * 10_000_019 + i)
        images.append(np.asarray(render(scene), dtype=np.uint8))
        captions.append(training_caption(scene, random.Random(seed * 7_919 + i)))
        full.append(caption(scene))
    return np.stack(images), captions, full


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def render_set(count: int, seed: int, workers: int | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """`count` training pictures (N, 64, 64, 3) uint8, their training captions (parts sometimes left out) and
    their full captions; the same for the same (count, seed), whatever the number of worker processes."""
    workers = workers or default_workers()
    size = max(1, count // (workers * 8))
    jobs = [(s, min(size, count - s), seed) for s in range(0, count, size)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_chunk, jobs))
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]], [c for p in parts for c in p[2]]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
