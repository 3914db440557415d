"""Memory options on every architecture's tiny model, on the CPU: gradient checkpointing changes no number, bf16
keeps what trains in fp32 and leaves the frozen weights untouched, and a stage that trains nothing on the text side
encodes each prompt once."""

from __future__ import annotations

import pytest
import torch

from personalize.data import generator
from personalize.loop import NullSink, run_stage
from personalize.models import load_components
from personalize.params import set_trainable, trained_parameters
from personalize.run_context import prepare_run
from personalize.step_engine import StepEngine
from personalize.step_record import Needs

ARCHS = ("sd15", "sdxl")


class Watch(NullSink):
    """Records each step's losses and whether the UNet recomputes its activations while the step ran."""

    def __init__(self, unet):
        self.unet, self.losses, self.checkpointing = unet, [], set()

    def log_metrics(self, metrics, step):
        self.losses.append(metrics["train/finetune/loss"])
        self.checkpointing.add(self.unet.is_gradient_checkpointing)


def dreambooth_stage(spec, model, **settings):
    spec = spec.model_copy(update=settings)
    ctx = prepare_run(spec, load_components(str(model)), progress=False)
    sink = Watch(ctx.components.unet)
    run_stage(ctx, 0, spec.method.stages[0], sink, None, 0, progress=False)
    weights = {k: v.detach().clone() for k, v in trained_parameters(ctx.models, spec.method.stages).items()}
    return ctx, sink, weights


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_changes_no_loss_and_no_weight(arch, spec_for, tiny_models):
    spec = spec_for("dreambooth", model=tiny_models[arch], stage_overrides={"steps": 3})
    _, plain, expected = dreambooth_stage(spec, tiny_models[arch])
    ctx, recomputed, weights = dreambooth_stage(spec, tiny_models[arch], gradient_checkpointing=True)
    assert plain.checkpointing == {False} and recomputed.checkpointing == {True}
    assert not ctx.components.unet.is_gradient_checkpointing  # switched off again after the stage
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6) for k in expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_keeps_the_trained_weights_in_fp32_and_the_frozen_ones_untouched(arch, spec_for, tiny_models):
    spec = spec_for("dreambooth", model=tiny_models[arch], stage_overrides={"steps": 2})
    before = {k: v.clone() for k, v in load_components(str(tiny_models[arch])).text_encoder.state_dict().items()}
    ctx, sink, weights = dreambooth_stage(spec, tiny_models[arch], mixed_precision="bf16", device="cpu")
    assert ctx.autocast_dtype == torch.bfloat16 and all(torch.isfinite(torch.tensor(sink.losses)))
    assert {v.dtype for v in weights.values()} == {torch.float32}  # the master weights of the whole UNet
    text = ctx.components.text_encoder.state_dict()
    assert {v.dtype for v in text.values() if v.is_floating_point()} == {torch.bfloat16}  # frozen: kept low
    assert all(torch.equal(text[k], before[k].to(text[k].dtype)) for k in before)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stage_with_a_frozen_text_side_encodes_each_prompt_once(arch, spec_for, tiny_models):
    calls = []
    for method in ("dreambooth", "textual_inversion"):
        ctx = prepare_run(spec_for(method, model=tiny_models[arch]), load_components(str(tiny_models[arch])), progress=False)
        for encoder in ctx.components.text_models.values():
            encoder.register_forward_hook(lambda *_, method=method: calls.append(method))
        set_trainable(ctx.models, ctx.spec.method.stages[-1])
        engine = StepEngine(ctx, Needs(prediction=True), None)
        for step in range(3):
            gen = generator(0, "step", 0, step)
            with torch.no_grad():
                engine.record(ctx.batcher.draw(2, gen, False), gen)
    encoders = 2 if arch == "sdxl" else 1
    assert calls.count("dreambooth") == encoders  # DreamBooth's one prompt, encoded at the first step only
    assert calls.count("textual_inversion") == encoders * 3  # the placeholder row trains: every step encodes
