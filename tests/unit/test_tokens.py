"""Placeholder tokens: new rows only, initialisation, roles in prompts, refusals."""

import logging

import pytest
import torch

from personalize.errors import ConceptError
from personalize.method_spec import PlaceholderSpec
from personalize.models import clip_tokenizer, tiny_text_encoder
from personalize.run_settings import ConceptSpec
from personalize.tokens import (
    PlaceholderEmbedding,
    add_placeholders,
    context_positions,
    find_roles,
    learned_rows,
    tokenize,
)


@pytest.fixture(scope="module")
def tokenizer_ids():
    return clip_tokenizer()


def fresh():
    torch.manual_seed(0)
    return clip_tokenizer(), tiny_text_encoder()


def concept(**kw):
    return ConceptSpec(**{"id": "dog7", "images": "x", "super_category": "dog", **kw})


def test_real_clip_ids(tokenizer_ids):
    assert len(tokenizer_ids) == 49408
    assert tokenizer_ids("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


def test_new_rows_are_the_only_parameters_and_start_from_the_init_word():
    tok, te = fresh()
    table = te.get_input_embeddings().weight.detach().clone()
    ph = add_placeholders(tok, te, PlaceholderSpec(vectors=2), concept())
    emb = te.get_input_embeddings()
    assert isinstance(emb, PlaceholderEmbedding)
    assert ph.tokens == [["<dog7>", "<dog7>_1"]] and ph.ids == [[49408, 49409]]
    assert emb.rows.shape == (2, 32)
    assert {n for n, p in emb.named_parameters()} == {"base.weight", "rows"}
    dog = tok("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(emb.rows[0], table[dog]) and torch.equal(emb.rows[1], table[dog])
    ids = tokenize(tok, ["a photo of <dog7> <dog7>_1 dog"])
    out = emb(ids)
    assert torch.equal(out[0, 4], emb.rows[0].detach()) and torch.equal(out[0, 1], table[320])


def test_gradient_reaches_only_the_new_rows():
    tok, te = fresh()
    add_placeholders(tok, te, PlaceholderSpec(), concept())
    te.requires_grad_(False)
    emb = te.get_input_embeddings()
    emb.rows.requires_grad_(True)
    te(tokenize(tok, ["a photo of a <dog7> dog"]))[0].sum().backward()
    assert emb.rows.grad is not None and emb.rows.grad.abs().sum() > 0
    assert emb.base.weight.grad is None


def test_init_from_a_token_id_and_from_a_split_word(caplog):
    tok, te = fresh()
    table = te.get_input_embeddings().weight.detach().clone()
    add_placeholders(tok, te, PlaceholderSpec(init="id:42170"), concept())
    assert torch.equal(te.get_input_embeddings().rows[0], table[42170])
    tok, te = fresh()
    with caplog.at_level(logging.WARNING):
        add_placeholders(tok, te, PlaceholderSpec(init="sculptureplushie"), concept())
    assert "splits into" in caplog.text


def test_refuses_a_placeholder_that_is_already_a_token():
    tok, te = fresh()
    with pytest.raises(ConceptError, match="'dog' already exists in the vocabulary"):
        add_placeholders(tok, te, PlaceholderSpec(string="dog"), concept())


def test_roles_placeholder_and_the_class_word_after_it():
    tok, te = fresh()
    ph = add_placeholders(tok, te, PlaceholderSpec(string="<{concept}-{index}>"), concept(
        super_category=None, subjects=[{"super_category": "cat"}, {"super_category": "dog"}]))
    ids = tokenize(tok, ["photo of a <dog7-1> cat and <dog7-2> dog", "a photo of a cat", "<dog7-2> dog"])
    cat, dog = (tok(w, add_special_tokens=False).input_ids[0] for w in ("cat", "dog"))
    roles = find_roles(ids, ph, [cat, dog])
    assert roles.placeholder.tolist() == [[4, 7], [-1, -1], [-1, 1]]
    assert roles.super_category.tolist() == [[5, 8], [-1, -1], [-1, 2]]
    keep = context_positions(ids[0], 4, 1, tok.eos_token_id)
    assert keep.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]


def test_learned_rows_layout():
    tok, te = fresh()
    ph = add_placeholders(tok, te, PlaceholderSpec(vectors=3), concept())
    rows = learned_rows(te, ph)
    assert list(rows) == ["<dog7>"] and rows["<dog7>"].shape == (3, 32)


def test_existing_identifier_word_adds_nothing():
    tok, te = fresh()
    ph = add_placeholders(tok, te, PlaceholderSpec(new_token=False, string="sks"), concept())
    assert ph.ids == [[48136]] and not ph.learned and len(tok) == 49408
    assert not isinstance(te.get_input_embeddings(), PlaceholderEmbedding)
