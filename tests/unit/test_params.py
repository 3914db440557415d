"""Trainable selectors: exact parameter sets, everything else frozen, errors when nothing matches."""

import pytest

from personalize.method_spec import PlaceholderSpec, StageSpec
from personalize.models import clip_tokenizer, tiny_text_encoder, tiny_unet
from personalize.params import SelectorError, select, set_trainable
from personalize.run_settings import ConceptSpec
from personalize.tokens import add_placeholders


@pytest.fixture(scope="module")
def models():
    te = tiny_text_encoder()
    add_placeholders(clip_tokenizer(), te, PlaceholderSpec(), ConceptSpec(id="c", images="x", super_category="dog"))
    return {"unet": tiny_unet(), "text_encoder": te}


def test_attn2_selects_q_k_v_out_of_every_cross_attention(models):
    chosen = select(models, ["unet.attn2"])
    layers = {n.rsplit(".attn2.", 1)[0] for n in chosen}
    assert len(layers) == 7  # 2 down + 1 mid + 4 up cross-attention layers of the tiny UNet
    kinds = {n.split(".attn2.", 1)[1] for n in chosen}
    assert kinds == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
    assert len(chosen) == 7 * 5
    assert set(select(models, ["unet.attn2.kv"])) == {n for n in chosen if ".to_k." in n or ".to_v." in n}


def test_set_trainable_freezes_everything_else(models):
    chosen = set_trainable(models, StageSpec(name="s", trainable=["placeholder", "unet.attn2.kv"], steps=1, lr=1.0,
                                             losses={"diffusion": 1.0}))
    trainable = {f"{m}.{n}" for m, model in models.items() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(chosen)
    assert "text_encoder.embeddings.token_embedding.rows" in trainable
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in trainable if n.startswith("unet."))


def test_unknown_and_empty_selectors_are_errors(models):
    with pytest.raises(SelectorError, match="unknown trainable selector 'unet.attn3'"):
        select(models, ["unet.attn3"])
    plain = {"unet": models["unet"], "text_encoder": tiny_text_encoder()}
    with pytest.raises(SelectorError, match="'placeholder' matches no parameter"):
        select(plain, ["placeholder"])
