"""What conditions the UNet on a prompt. SD 1.x / 2.x: the text encoder's output. SDXL: both encoders' penultimate
layers side by side, the second encoder's pooled output, and the added time ids (original size, crop corner,
target size), as diffusers' SDXL pipeline and training scripts build them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from personalize.tokens import tokenize


@dataclass
class TextCondition:
    hidden: torch.Tensor  # (batch, 77, width): the UNet's cross-attention context
    pooled: torch.Tensor | None = None  # SDXL: (batch, pooled width)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def expand(self, batch: int) -> TextCondition:
        """One prompt's condition repeated for a batch (no copy)."""
        return TextCondition(self.hidden.expand(batch, -1, -1), None if self.pooled is None else self.pooled.expand(batch, -1))

    @staticmethod
    def stack(parts: list[TextCondition]) -> TextCondition:
        pooled = None if parts[0].pooled is None else torch.stack([p.pooled for p in parts])
        return TextCondition(torch.stack([p.hidden for p in parts]), pooled)

    def split(self) -> list[TextCondition]:
        """One condition per prompt (rows without the batch dimension), e.g. to cache them."""
        return [TextCondition(self.hidden[i], None if self.pooled is None else self.pooled[i]) for i in range(len(self))]


def encode_prompts(components, prompts: list[str], device) -> TextCondition:
    if not components.is_sdxl:
        return TextCondition(components.text_encoder(tokenize(components.tokenizer, prompts).to(device))[0])
    hidden, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_models.values()):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected end-of-text output
    return TextCondition(torch.cat(hidden, dim=-1), pooled)


def added_time_ids(components, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's (original h, w, crop top, left, target h, w) per sample: the training size, uncropped."""
    h, w = (side * components.vae_scale for side in latents.shape[-2:])
    return torch.tensor([h, w, 0, 0, h, w], device=latents.device, dtype=dtype).expand(latents.shape[0], 6)


def unet_forward(components, noisy: torch.Tensor, timesteps: torch.Tensor, condition: TextCondition) -> torch.Tensor:
    """The UNet's prediction for noisy latents under a prompt condition."""
    extra = {}
    if condition.pooled is not None:
        extra["added_cond_kwargs"] = {"text_embeds": condition.pooled,
                                      "time_ids": added_time_ids(components, noisy, condition.pooled.dtype)}
    return components.unet(noisy, timesteps, condition.hidden, **extra).sample
