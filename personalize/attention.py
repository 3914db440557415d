"""Cross-attention capture: one processor, a store, and a context manager that installs them.

Only the layers a loss (or a heat map) needs get the capturing processor; it computes the
softmax probabilities explicitly and records them. Every other layer keeps the fast SDPA path.
The same processor can detach the start-of-text key/value (Custom Diffusion), which changes
gradients only, never outputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CaptureSpec:
    """Which cross-attention layers to record: a name regex and/or latent resolutions (e.g. 16 for 16x16)."""

    name_pattern: str = r"attn2"
    resolutions: tuple[int, ...] | None = None

    def merge(self, other: CaptureSpec | None) -> CaptureSpec:
        if other is None:
            return self
        if self.resolutions is None or other.resolutions is None:
            res = None
        else:
            res = tuple(sorted(set(self.resolutions) | set(other.resolutions)))
        pattern = self.name_pattern if self.name_pattern == other.name_pattern else f"(?:{self.name_pattern})|(?:{other.name_pattern})"
        return CaptureSpec(pattern, res)


@dataclass
class AttentionStore:
    """Maps of one forward pass: layer name -> probabilities (batch, heads, queries, keys).

    `spec` says what the next forward records; set it to None to record nothing (processors stay installed).
    """

    spec: CaptureSpec | None
    latent_hw: tuple[int, int] = (0, 0)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    resolutions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def resolution_of(self, queries: int) -> tuple[int, int]:
        h, w = self.latent_hw
        if h * w == 0:  # latent size not given: assume square
            side = round(math.sqrt(queries))
            return side, side
        factor = math.sqrt(h * w / queries)
        return round(h / factor), round(w / factor)

    def wants(self, name: str, queries: int) -> bool:
        if self.spec is None or not re.search(self.spec.name_pattern, name):
            return False
        return self.spec.resolutions is None or self.resolution_of(queries)[0] in self.spec.resolutions

    def put(self, name: str, probs: torch.Tensor) -> None:
        self.maps[name] = probs
        self.resolutions[name] = self.resolution_of(probs.shape[2])

    def take(self) -> dict[str, torch.Tensor]:
        maps, self.maps = self.maps, {}
        return maps

    @contextmanager
    def recording(self, spec: CaptureSpec | None, latent_hw: tuple[int, int]) -> Iterator[dict[str, torch.Tensor]]:
        """Record one forward with `spec`; the yielded dict is filled with its maps on exit."""
        self.spec, self.latent_hw, self.maps = spec, latent_hw, {}
        out: dict[str, torch.Tensor] = {}
        try:
            yield out
        finally:
            out.update(self.take())
            self.spec = None


class MapAccumulator(AttentionStore):
    """Sums head-averaged maps over many forwards (a whole sampling run) instead of keeping the last one.

    With classifier-free guidance only the conditional half of each batch is kept (`conditional_half`).
    """

    def __init__(self, spec: CaptureSpec, conditional_half: bool = True):
        super().__init__(spec)
        self.conditional_half = conditional_half
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def put(self, name: str, probs: torch.Tensor) -> None:
        if self.conditional_half:
            probs = probs[probs.shape[0] // 2 :]
        mean = probs.detach().float().mean(1)  # (B, Q, K)
        self.sums[name] = self.sums.get(name, 0) + mean
        self.counts[name] = self.counts.get(name, 0) + 1
        self.resolutions[name] = self.resolution_of(probs.shape[2])

    def averaged(self) -> dict[str, torch.Tensor]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}


class PersonalizeAttnProcessor:
    """SDPA attention that can record cross-attention probabilities and detach the start-token key/value."""

    def __init__(self, name: str, store: AttentionStore | None = None, detach_start_token: bool = False):
        self.name = name
        self.store = store
        self.detach_start_token = detach_start_token

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        if self.detach_start_token:
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if self.store is not None and self.store.wants(self.name, query.shape[2]):
            scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            self.store.put(self.name, probs)
            out = torch.matmul(probs.to(value.dtype), value)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[str]:
    """Processor names of every cross-attention (attn2) layer, in forward order."""
    return [name for name in unet.attn_processors if ".attn2." in name]


@contextmanager
def attention_hooks(
    unet, capture: CaptureSpec | None = None, detach_start_token: bool = False, store: AttentionStore | None = None
) -> Iterator[AttentionStore | None]:
    """Install capturing / detaching processors on the selected cross-attention layers; restore on exit.
    A given `store` (e.g. a MapAccumulator) is used instead of a fresh AttentionStore."""
    original = unet.attn_processors
    if capture is None and not detach_start_token:
        yield None
        return
    if store is None and capture is not None:
        store = AttentionStore(capture)
    pattern = re.compile(capture.name_pattern) if capture is not None else None
    processors = {}
    for name, proc in original.items():
        if ".attn2." not in name:
            processors[name] = proc
            continue
        layer_store = store if pattern is not None and pattern.search(name) else None
        if layer_store is None and not detach_start_token:
            processors[name] = proc
        else:
            processors[name] = PersonalizeAttnProcessor(name.removesuffix(".processor"), layer_store, detach_start_token)
    unet.set_attn_processor(processors)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
