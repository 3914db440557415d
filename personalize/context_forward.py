"""CoRe's context forward: each step, a regularisation template filled with the subject and with its
super-category, through the text encoder and (for the attention term) the UNet. Registered in
personalize/forwards.py; the loss terms that read it declare `Needs(context=True)`."""

from __future__ import annotations

from typing import Any

import torch

from personalize.step_record import ContextRecord, StepRecord
from personalize.text_conditioning import encode_prompts
from personalize.tokens import context_positions, find_roles, tokenize


def context_forward(engine: Any, rec: StepRecord, noisy: torch.Tensor, timesteps: torch.Tensor, gen: torch.Generator) -> None:
    """CoRe: a regularisation template filled with the subject (as the method names it) and with the
    super-category; both encoded and, if needed, run through the UNet on this step's noisy latents.
    Context tokens are everything from SOT to EOT except the subject's tokens. The reference side has
    no gradient. `engine` is the step's StepEngine (its context prompts, needs and UNet forward)."""
    ctx, comps = engine.ctx, engine.ctx.components
    pool = engine.context_prompts
    template = pool[int(torch.randint(len(pool), (), generator=gen))].replace("{placeholder}", "{}")
    target_prompt = template.replace("{}", ctx.subject)
    reference_prompt = template.replace("{}", ctx.placeholders.super_categories[0])
    ids = tokenize(comps.tokenizer, [target_prompt, reference_prompt])
    roles = find_roles(ids[:1], ctx.placeholders, ctx.class_ids)
    start = int(roles.placeholder[0, 0])
    if start < 0:
        raise ValueError(f"regularisation prompt {target_prompt!r} lost the placeholder (truncated?)")
    subject_len = roles.placeholder_len + (1 if int(roles.super_category[0, 0]) >= 0 else 0)
    eos = comps.tokenizer.eos_token_id
    target_keep = context_positions(ids[0], start, subject_len, eos)
    reference_keep = context_positions(ids[1], start, 1, eos)
    if len(target_keep) != len(reference_keep):
        raise ValueError(f"context prompts do not align: {target_prompt!r} vs {reference_prompt!r}")
    target = encode_prompts(comps, [target_prompt], ctx.device)
    with torch.no_grad():
        reference = encode_prompts(comps, [reference_prompt], ctx.device)
    record = ContextRecord(target_prompt, reference_prompt, target.hidden, reference.hidden,
                           target_keep.to(ctx.device), reference_keep.to(ctx.device))
    if engine.needs.context_capture is not None:
        batch = noisy.shape[0]
        with torch.no_grad():
            _, record.reference_maps = engine.unet(noisy, timesteps, reference.expand(batch), engine.needs.context_capture)
        _, record.target_maps = engine.unet(noisy, timesteps, target.expand(batch), engine.needs.context_capture)
    rec.context = record
