"""One training step's forward work: noise, text encoding, UNet forwards, attention capture -> StepRecord.

Only what the stage's loss terms declared is computed: no main forward for a regulariser-only stage,
no capture unless a term reads maps, and a registered extra forward (personalize/forwards.py: CoRe's context
prompts) only when a term asks for it.
"""

from __future__ import annotations

import contextlib

import torch

from personalize.attention import AttentionStore
from personalize.data import Batch
from personalize.forwards import EXTRA_FORWARDS
from personalize.params import text_side_frozen
from personalize.run_context import RunContext
from personalize.step_record import Needs, StepRecord
from personalize.text_conditioning import TextCondition, encode_prompts, unet_forward
from personalize.tokens import find_roles, tokenize


class StepEngine:
    def __init__(self, ctx: RunContext, needs: Needs, store: AttentionStore | None, prompt_override: list[str] | None = None,
                 context_prompts: list[str] | None = None, noise_offset: float = 0.0):
        self.ctx = ctx
        self.noise_offset = noise_offset
        self.needs = needs
        self.store = store
        self.prompt_override = prompt_override
        self.context_prompts = context_prompts or ctx.context_templates
        self.text_cache: dict[str, TextCondition] | None = {} if text_side_frozen(ctx.models) else None

    def autocast(self):
        dtype = self.ctx.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    def encode(self, prompts: list[str]) -> TextCondition:
        """The prompts' UNet condition; cached per prompt while the text side is frozen."""
        comps = self.ctx.components
        if self.text_cache is None:
            return encode_prompts(comps, prompts, self.ctx.device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        if missing:
            with torch.no_grad():
                self.text_cache.update(zip(missing, encode_prompts(comps, missing, self.ctx.device).split()))
        return TextCondition.stack([self.text_cache[p] for p in prompts])

    def unet(self, noisy, timesteps, condition: TextCondition, capture) -> tuple[torch.Tensor, dict]:
        """A UNet forward recording exactly `capture` (None: nothing, on the fast path) when processors are installed."""
        if self.store is None:
            return unet_forward(self.ctx.components, noisy, timesteps, condition), {}
        with self.store.recording(capture, tuple(noisy.shape[-2:])) as maps:
            pred = unet_forward(self.ctx.components, noisy, timesteps, condition)
        return pred, maps

    def record(self, batch: Batch, gen: torch.Generator) -> StepRecord:
        ctx, comps = self.ctx, self.ctx.components
        device = ctx.device
        prompts = self._prompts(batch, gen)
        latents = batch.latents.to(device)
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, comps.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        if self.noise_offset:  # drawn after the timesteps, so a run without it draws exactly what it drew before
            noise = noise + self.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = comps.noise_scheduler.add_noise(latents, noise, timesteps)
        alpha_bar = comps.noise_scheduler.alphas_cumprod.to(device)[timesteps].float()
        with self.autocast():
            ids = tokenize(comps.tokenizer, prompts)
            rec = StepRecord(
                timesteps=timesteps,
                is_prior=batch.is_prior.to(device),
                snr=alpha_bar / (1 - alpha_bar),
                prediction_type=comps.noise_scheduler.config.prediction_type,
                tokens=find_roles(ids, ctx.placeholders, ctx.class_ids).to(device),
                loss_mask=batch.masks.to(device) if batch.masks is not None else None,
            )
            if self.needs.prediction:
                rec.model_pred, rec.attention = self.unet(noisy, timesteps, self.encode(prompts), self.needs.capture)
                rec.attention_resolution = dict(self.store.resolutions) if self.store else {}
                rec.target = noise if comps.noise_scheduler.config.prediction_type == "epsilon" else comps.noise_scheduler.get_velocity(latents, noise, timesteps)
            for forward in EXTRA_FORWARDS.values():
                if forward.wanted(self.needs):
                    forward.run(self, rec, noisy, timesteps, gen)
        return rec

    def _prompts(self, batch: Batch, gen: torch.Generator) -> list[str]:
        if not self.prompt_override:
            return batch.prompts
        pick = torch.randint(len(self.prompt_override), (len(batch.prompts),), generator=gen).tolist()
        return [self.ctx.placeholders.fill(self.prompt_override[i]) for i in pick]
