"""How much of a prompt's cross-attention the subject's placeholder takes while a run generates.

At every image position, cross-attention spreads one unit of probability over the prompt's keys. The share
counts only the placeholder and the context words (start-of-text, end-of-text and padding left out, since they
soak up most of the mass whatever the prompt says; the class word right after the placeholder too, so that
"a photo of <V> in the snow" and "a photo of sks star in the snow" compare over the same words) and measures
what part of it lands on the placeholder's tokens, averaged over positions, layers, denoising steps and prompts.
AttnDreamBooth (its introduction) observes that Textual Inversion "overfits the textual embedding": the learned
token takes the attention that context words ("drawing", "box") should get, so its share is high; DreamBooth
overlooks the new token, so its share is low.
"""

from __future__ import annotations

import torch

from personalize.attention import CaptureSpec, MapAccumulator, attention_hooks
from personalize.sampling import generate
from personalize.tokens import tokenize, word_ids


def word_positions(input_ids: list[int], eos_id: int) -> list[int]:
    """Positions of a tokenized prompt's words: after start-of-text, before the first end-of-text."""
    end = input_ids.index(eos_id, 1) if eos_id in input_ids[1:] else len(input_ids)
    return list(range(1, end))


def class_word_positions(input_ids: list[int], placeholder_ids: list[list[int]], class_ids: list[list[int]]) -> set[int]:
    """Positions of each subject's class word where it directly follows that subject's placeholder tokens."""
    found = set()
    for mine, word in zip(placeholder_ids, class_ids, strict=True):
        for start in range(len(input_ids) - len(mine) + 1):
            after = start + len(mine)
            if input_ids[start:after] == mine and input_ids[after:after + len(word)] == word:
                found.update(range(after, after + len(word)))
    return found


def placeholder_share(maps: dict[str, torch.Tensor], placeholder: list[list[int]], words: list[list[int]]) -> float:
    """Mean over layers, samples and image positions of the attention on the placeholder's positions divided by
    the attention on all the prompt's word positions. `maps`: layer -> (samples, positions, keys); the position
    lists are per sample (the placeholder's are among its words)."""
    if not maps:
        raise ValueError("no cross-attention maps were captured")
    per_layer = []
    for probs in maps.values():
        shares = []
        for b, (mine, all_words) in enumerate(zip(placeholder, words, strict=True)):
            if not mine:
                raise ValueError(f"sample {b}: the placeholder is not in its prompt")
            on_words = probs[b][:, all_words].sum(-1)
            shares.append((probs[b][:, mine].sum(-1) / on_words.clamp_min(1e-12)).mean())
        per_layer.append(torch.stack(shares).mean())
    return float(torch.stack(per_layer).mean())


def subject_attention_share(run, prompts: list[str], seed: int, steps: int, guidance_scale: float,
                            scheduler: str = "ddim") -> float:
    """The placeholder's share of word attention while `run` (a personalize.sampling.LoadedRun) samples each
    prompt once with `seed`; every cross-attention layer counts."""
    components, placeholders = run.components, run.placeholders
    tokenizer = components.tokenizer
    ids = tokenize(tokenizer, prompts).tolist()
    class_ids = [word_ids(tokenizer, word) for word in placeholders.super_categories]
    words = []
    for row in ids:
        class_words = class_word_positions(row, placeholders.ids, class_ids)
        words.append([p for p in word_positions(row, tokenizer.eos_token_id) if p not in class_words])
    ph_ids = {i for subject in placeholders.ids for i in subject}
    placeholder = [[p for p in w if row[p] in ph_ids] for row, w in zip(ids, words)]
    store = MapAccumulator(CaptureSpec(), conditional_half=guidance_scale > 1.0)
    pipe = run.pipeline(scheduler)
    with attention_hooks(components.unet, CaptureSpec(), store=store):
        # one batch: the accumulator sums maps per batch row, so every row must be the same prompt throughout
        generate(pipe, prompts, [seed] * len(prompts), run.spec.resolution, steps, guidance_scale, len(prompts))
    return placeholder_share(store.averaged(), placeholder, words)
