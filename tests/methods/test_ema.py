"""EMA of the trained weights: the formula after N updates, what the stage leaves behind, and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from personalize import stage_hooks
from personalize.errors import ConfigError
from personalize.faults import InjectedFault
from personalize.loop import NullSink, run_method, run_stage
from personalize.models import load_components
from personalize.run_context import prepare_run
from personalize.tokens import placeholder_embedding

DECAY = 0.6


class Recorder:
    """A stage hook that keeps the live weights after every update (the EMA hook runs before it)."""

    def __init__(self, rows):
        self.rows, self.seen = rows, []

    def before_step(self, step):
        pass

    def after_update(self, step):
        self.seen.append(self.rows.detach().clone())

    def state(self):
        return {}


def test_the_stage_ends_with_the_ema_of_its_updates(spec_for, tiny_model, monkeypatch):
    spec = spec_for("textual_inversion", stage_overrides={"lr": 5e-2, "steps": 4, "ema_decay": DECAY})
    ctx = prepare_run(spec, load_components(str(tiny_model)), progress=False)
    rows = placeholder_embedding(ctx.components.text_encoder).rows
    start = rows.detach().clone()
    recorder = Recorder(rows)
    monkeypatch.setitem(stage_hooks.STAGE_HOOKS, "recorder", lambda ctx, stage, state: recorder)
    run_stage(ctx, 0, spec.method.stages[0], NullSink(), None, 0, progress=False)

    expected = start
    for live in recorder.seen:  # shadow = decay x shadow + (1 - decay) x weights, from the stage's first weights
        expected = DECAY * expected + (1 - DECAY) * live
    assert len(recorder.seen) == 4
    assert torch.allclose(rows.detach(), expected, atol=1e-7, rtol=0)
    assert not torch.allclose(rows.detach(), recorder.seen[-1])  # the stage leaves the EMA, not the last update


def test_an_ema_stage_resumed_mid_way_equals_an_uninterrupted_one(spec_for, tiny_model, tmp_path, monkeypatch):
    overrides = {"lr": 5e-2, "steps": 4, "ema_decay": DECAY}
    reference = spec_for("textual_inversion", stage_overrides=overrides, output_dir=str(tmp_path / "a"), checkpoint_every=1)
    run_method(reference, components=load_components(str(tiny_model)), progress=False)
    spec = spec_for("textual_inversion", stage_overrides=overrides, output_dir=str(tmp_path / "b"), checkpoint_every=1)
    monkeypatch.setenv("PERSONALIZE_INJECT_FAULT", f"embedding:2:{tmp_path / 'marker'}")
    with pytest.raises(InjectedFault):
        run_method(spec, components=load_components(str(tiny_model)), progress=False)
    shadow = load_file(str(spec.run_dir / "checkpoints" / "latest" / "hooks.safetensors"))
    assert set(shadow) == {"ema::text_encoder.embeddings.token_embedding.rows"}
    monkeypatch.delenv("PERSONALIZE_INJECT_FAULT")
    assert run_method(spec, components=load_components(str(tiny_model)), progress=False, resume=True).status == "finished"
    a = load_file(str(reference.run_dir / "learned_embeds.safetensors"))
    b = load_file(str(spec.run_dir / "learned_embeds.safetensors"))
    assert torch.equal(a["<blob>"], b["<blob>"])


def test_ema_is_off_unless_set_and_leaves_older_runs_hashes_alone(spec_for):
    plain = spec_for("textual_inversion")
    assert plain.method.stages[0].ema_decay is None
    assert spec_for("textual_inversion", stage_overrides={"ema_decay": 0.99}).config_hash() != plain.config_hash()
    with pytest.raises(ConfigError, match="ema_decay"):
        spec_for("textual_inversion", stage_overrides={"ema_decay": 1.0})
