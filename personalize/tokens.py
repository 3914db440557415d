"""Placeholder tokens: add them, initialise them, find them in prompts.

Only the new rows are parameters: the 49,408-row embedding table is never copied, resized or
put in an optimizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from personalize.errors import ConceptError
from personalize.method_spec import PlaceholderSpec
from personalize.run_settings import ConceptSpec
from personalize.step_record import TokenRoles

log = logging.getLogger(__name__)

MAX_LENGTH = 77


class PlaceholderEmbedding(nn.Module):
    """A token embedding whose ids >= the base vocabulary read from `rows` (the only trainable part)."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.rows = nn.Parameter(rows.detach().clone().float())

    @property
    def base_vocab(self) -> int:
        return self.base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.rows.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.base_vocab
        out = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        if is_new.any():
            new = self.rows[(ids - self.base_vocab).clamp(min=0)].to(out.dtype)
            out = torch.where(is_new.unsqueeze(-1), new, out)
        return out


@dataclass
class Placeholders:
    """Per subject: the token strings, their ids, the prompt string, and the super-category word."""

    tokens: list[list[str]]
    ids: list[list[int]]
    strings: list[str]
    super_categories: list[str]
    learned: bool  # False for an existing identifier word (DreamBooth's "sks")

    @property
    def vectors(self) -> int:
        return len(self.ids[0])

    def fill(self, template: str) -> str:
        """Fill {placeholder}, {super_category}, {subjects} (and {}, meaning {placeholder}) in a prompt template."""
        subjects = " and ".join(f"{s} {c}" for s, c in zip(self.strings, self.super_categories))
        text = template.replace("{}", "{placeholder}")
        return text.format(placeholder=self.strings[0], super_category=self.super_categories[0], subjects=subjects)


def placeholder_embedding(text_encoder) -> PlaceholderEmbedding | None:
    emb = text_encoder.get_input_embeddings()
    return emb if isinstance(emb, PlaceholderEmbedding) else None


def in_vocabulary(tokenizer, token: str) -> bool:
    vocab = tokenizer.get_vocab()
    return token in vocab or f"{token}</w>" in vocab or token.lower() + "</w>" in vocab


def word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(word, add_special_tokens=False).input_ids


def single_token_id(tokenizer, word: str, concept_id: str) -> int:
    """The id of a word that must be one CLIP token (methods that locate the super-category token need this)."""
    ids = word_ids(tokenizer, word)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConceptError(
            concept_id,
            f"super-category {word!r} is {len(ids)} CLIP tokens {pieces}, but this method locates the class by one token",
            "use a one-token word for super_category (e.g. 'toy' instead of 'stuffed animal')",
        )
    return ids[0]


def _init_row(tokenizer, base: nn.Embedding, init: str, super_category: str, concept_id: str) -> torch.Tensor:
    if init.startswith("id:"):
        if not init[3:].isdigit():
            raise ConceptError(concept_id, f"placeholder init {init!r} is not a token id", "write it as id:<number>, e.g. id:42170")
        token_id = int(init[3:])
        if not 0 <= token_id < base.num_embeddings:
            raise ConceptError(concept_id, f"init token id {token_id} is outside the vocabulary", "use an id below the vocabulary size")
        return base.weight[token_id].detach().clone()
    word = super_category if init == "super_category" else init
    ids = word_ids(tokenizer, word)
    if not ids:
        raise ConceptError(concept_id, f"init word {word!r} has no tokens", "give a real word")
    if len(ids) > 1:
        log.warning("concept %s: init word %r splits into %d tokens; using the first, %r", concept_id, word, len(ids),
                    tokenizer.convert_ids_to_tokens(ids[:1])[0])
    return base.weight[ids[0]].detach().clone()


def add_placeholders(tokenizer, text_encoder, spec: PlaceholderSpec, concept: ConceptSpec) -> Placeholders:
    """Add the concept's placeholder tokens to the tokenizer and new rows to the text encoder's embedding."""
    categories = [s.super_category for s in concept.subjects]
    if not spec.new_token:
        ids = word_ids(tokenizer, spec.string)
        return Placeholders([tokenizer.convert_ids_to_tokens(ids)], [ids], [spec.string], categories[:1], learned=False)

    base = text_encoder.get_input_embeddings()
    if isinstance(base, PlaceholderEmbedding):
        raise ConceptError(concept.id, "the text encoder already holds placeholder rows", "load a fresh base model per run")
    if len(tokenizer) != base.num_embeddings:
        raise ConceptError(concept.id, f"tokenizer has {len(tokenizer)} tokens but the embedding {base.num_embeddings} rows",
                           "use a tokenizer and text encoder from the same model")
    inits = spec.init if isinstance(spec.init, list) else [spec.init] * len(categories)
    if len(inits) != len(categories):
        raise ConceptError(concept.id, f"placeholder.init lists {len(inits)} initialisations for {len(categories)} subjects",
                           "give one init per subject (or a single value for all)")
    tokens, rows, strings = [], [], []
    for j, category in enumerate(categories):
        name = spec.string.format(concept=concept.id, index=j + 1)
        subject_tokens = [name] + [f"{name}_{k}" for k in range(1, spec.vectors)]
        for token in subject_tokens:
            if in_vocabulary(tokenizer, token):
                raise ConceptError(concept.id, f"placeholder {token!r} already exists in the vocabulary",
                                   "choose a placeholder string that is not a CLIP token, e.g. '<my-concept>'")
        init = inits[j]
        rows += [_init_row(tokenizer, base, init, category, concept.id)] * spec.vectors
        tokens.append(subject_tokens)
        strings.append(" ".join(subject_tokens))
    flat = [t for ts in tokens for t in ts]
    if len(set(flat)) != len(flat):
        raise ConceptError(concept.id, f"placeholder tokens repeat: {flat}", "include {index} in placeholder.string")
    tokenizer.add_tokens(flat)
    ids = [tokenizer.convert_tokens_to_ids(ts) for ts in tokens]
    text_encoder.set_input_embeddings(PlaceholderEmbedding(base, torch.stack(rows)))
    return Placeholders(tokens, ids, strings, categories, learned=True)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids


def _find(row: list[int], pattern: list[int]) -> int:
    n = len(pattern)
    for i in range(len(row) - n + 1):
        if row[i : i + n] == pattern:
            return i
    return -1


def find_roles(input_ids: torch.Tensor, placeholders: Placeholders, class_ids: list[int | None]) -> TokenRoles:
    """Per sample and subject: where the placeholder starts, and where its class word (right after it) is."""
    rows = input_ids.tolist()
    subjects = len(placeholders.ids)
    ph = torch.full((len(rows), subjects), -1, dtype=torch.long)
    cls = torch.full((len(rows), subjects), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        for j, ids in enumerate(placeholders.ids):
            start = _find(row, ids)
            if start < 0:
                continue
            ph[b, j] = start
            after = start + len(ids)
            if class_ids[j] is not None and after < len(row) and row[after] == class_ids[j]:
                cls[b, j] = after
    return TokenRoles(ph, placeholders.vectors, cls)


def context_positions(ids: torch.Tensor, exclude_start: int, exclude_len: int, eos_id: int) -> torch.Tensor:
    """Positions 0..EOT (inclusive) of one tokenized prompt, minus [exclude_start, exclude_start + exclude_len)."""
    row = ids.tolist()
    eot = row.index(eos_id, 1) if eos_id in row[1:] else len(row) - 1
    keep = [i for i in range(eot + 1) if not exclude_start <= i < exclude_start + exclude_len]
    return torch.tensor(keep, dtype=torch.long)


def learned_rows(text_encoder, placeholders: Placeholders) -> dict[str, torch.Tensor]:
    """{first token of each subject: (vectors, D)} in diffusers' textual-inversion layout."""
    emb = placeholder_embedding(text_encoder)
    if emb is None or not placeholders.learned:
        return {}
    out = {}
    for tokens, ids in zip(placeholders.tokens, placeholders.ids):
        out[tokens[0]] = emb.rows[[i - emb.base_vocab for i in ids]].detach().float().cpu().clone()
    return out


# --------------------------------------------------------------------------------------------
# Every text encoder of a model: SDXL gives a placeholder a row in each (as diffusers' SDXL textual inversion
# does). A placeholder's vector is then its rows joined end to end, [CLIP-L | OpenCLIP-bigG], the way SDXL's
# UNet reads the two encoders' outputs side by side.


def add_subject_tokens(components, spec: PlaceholderSpec, concept: ConceptSpec) -> Placeholders:
    """The concept's placeholders in the model's tokenizer and text encoder, and in SDXL's second pair too."""
    placeholders = add_placeholders(components.tokenizer, components.text_encoder, spec, concept)
    if components.is_sdxl:
        second = add_placeholders(components.tokenizer_2, components.text_encoder_2, spec, concept)
        if second.ids != placeholders.ids:  # both tokenizers hold the same vocabulary, so the new ids agree
            raise ConceptError(concept.id, f"the placeholders got ids {placeholders.ids} and {second.ids} in the two "
                               "tokenizers", "use a model whose two tokenizers share one vocabulary (SDXL's do)")
    return placeholders


def placeholder_embeddings(components) -> list[PlaceholderEmbedding]:
    """Each text encoder's placeholder embedding (none for a method that uses an existing word)."""
    found = [placeholder_embedding(encoder) for encoder in components.text_models.values()]
    return [emb for emb in found if emb is not None]


def joined_rows(components) -> torch.Tensor:
    """(rows, width of all encoders): each placeholder vector's rows joined end to end."""
    return torch.cat([emb.rows.detach() for emb in placeholder_embeddings(components)], dim=1)


def restore_joined_rows(components, rows: torch.Tensor) -> None:
    """Put joined rows (as joined_rows gives them) back into each encoder's placeholder embedding."""
    start = 0
    with torch.no_grad():
        for emb in placeholder_embeddings(components):
            width = emb.rows.shape[1]
            emb.rows.copy_(rows[:, start : start + width])
            start += width


def learned_vectors(components, placeholders: Placeholders) -> dict[str, torch.Tensor]:
    """learned_rows over every text encoder, each subject's rows joined end to end."""
    per_encoder = [learned_rows(encoder, placeholders) for encoder in components.text_models.values()]
    per_encoder = [rows for rows in per_encoder if rows]
    if not per_encoder:
        return {}
    return {token: torch.cat([rows[token] for rows in per_encoder], dim=1) for token in per_encoder[0]}
