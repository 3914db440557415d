"""What one training step produces, and what a loss term can ask for.

Loss terms are pure functions of a StepRecord; each declares its Needs so the loop computes
(and captures) only what some active term uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from personalize.attention import CaptureSpec


@dataclass(frozen=True)
class Needs:
    prediction: bool = False  # the main UNet forward on the batch
    capture: CaptureSpec | None = None  # attention maps of the main forward
    context: bool = False  # a regularisation prompt pair [V] / super-category, through the text encoder
    context_capture: CaptureSpec | None = None  # UNet forwards on the pair, with attention maps
    single_token_class: bool = False  # the super-category must be one CLIP token

    def merge(self, other: Needs) -> Needs:
        def both(a, b):
            return b if a is None else a.merge(b)

        return Needs(
            prediction=self.prediction or other.prediction,
            capture=both(self.capture, other.capture),
            context=self.context or other.context,
            context_capture=both(self.context_capture, other.context_capture),
            single_token_class=self.single_token_class or other.single_token_class,
        )


@dataclass
class TokenRoles:
    """Token positions per sample (-1 where absent): shape (batch, subjects)."""

    placeholder: torch.Tensor  # first position of each subject's placeholder
    placeholder_len: int  # vectors per placeholder
    super_category: torch.Tensor  # first token of each subject's class word

    def to(self, device) -> TokenRoles:
        return TokenRoles(self.placeholder.to(device), self.placeholder_len, self.super_category.to(device))


@dataclass
class ContextRecord:
    """One regularisation template filled with [V] (target) and with the super-category (reference)."""

    target_prompt: str
    reference_prompt: str
    target_embeds: torch.Tensor  # (1, 77, D) text-encoder output of the [V] prompt
    reference_embeds: torch.Tensor  # (1, 77, D), no gradient
    target_keep: torch.Tensor  # positions of context tokens (SOT, words, EOT) in the [V] prompt
    reference_keep: torch.Tensor  # the same tokens in the reference prompt
    target_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, heads, Q, 77)
    reference_maps: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepRecord:
    timesteps: torch.Tensor
    is_prior: torch.Tensor  # (B,) bool
    tokens: TokenRoles
    snr: torch.Tensor | None = None  # (B,) signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep
    prediction_type: str = "epsilon"  # what the UNet predicts: epsilon or v_prediction
    model_pred: torch.Tensor | None = None
    target: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None  # (B, 1, h, w), 1 where the loss counts
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (B, heads, Q, 77)
    attention_resolution: dict[str, tuple[int, int]] = field(default_factory=dict)
    context: ContextRecord | None = None
    cache: dict = field(default_factory=dict)  # values several terms derive from the same maps
