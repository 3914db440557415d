"""Training options as stage settings, each off by default: the noise offset on the tiny model's training step,
and min-SNR weighting reaching the loss the loop optimises."""

import pytest
import torch

from personalize.data import generator
from personalize.models import load_components
from personalize.run_context import prepare_run
from personalize.step_engine import StepEngine
from personalize.step_record import Needs


def step_records(spec, tiny_model, offsets):
    ctx = prepare_run(spec, load_components(str(tiny_model)), progress=False)
    records = []
    for offset in offsets:
        engine = StepEngine(ctx, Needs(prediction=True), None, None, None, offset)
        gen = generator(0, "step", 0, 0)
        with torch.no_grad():
            records.append(engine.record(ctx.batcher.draw(2, gen, False), gen))
    return ctx, records


def test_noise_offset_adds_one_value_per_sample_and_channel_and_is_off_by_default(spec_for, tiny_model):
    spec = spec_for("textual_inversion")
    ctx, (plain, again, offset) = step_records(spec, tiny_model, [0.0, 0.0, 0.1])
    assert torch.equal(plain.target, again.target) and torch.equal(plain.timesteps, offset.timesteps)
    shift = offset.target - plain.target  # epsilon target: the noise itself
    per_channel = shift.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel), atol=1e-6)  # constant over pixels
    assert 0.01 < per_channel[..., 0].abs().mean().item() < 0.5  # about 0.1 x |N(0, 1)|
    assert spec.method.stages[0].noise_offset == 0.0


def test_snr_reaches_the_record_and_options_keep_the_config_hash_until_set(spec_for, tiny_model):
    spec = spec_for("dreambooth")
    ctx, (rec,) = step_records(spec, tiny_model, [0.0])
    alpha_bar = ctx.components.noise_scheduler.alphas_cumprod[rec.timesteps]
    assert rec.snr.tolist() == pytest.approx((alpha_bar / (1 - alpha_bar)).tolist(), rel=1e-5)
    assert rec.prediction_type == "epsilon"
    plain = spec.config_hash()
    assert spec_for("dreambooth", stage_overrides={"noise_offset": 0.0}).config_hash() == plain
    assert spec_for("dreambooth", stage_overrides={"noise_offset": 0.05}).config_hash() != plain
    snr = spec_for("dreambooth", stage_overrides={"losses.diffusion.min_snr_gamma": 5.0})  # a loss given as its weight
    assert snr.method.stages[0].losses["diffusion"].params == {"min_snr_gamma": 5.0}
    assert snr.method.stages[0].losses["diffusion"].weight == 1.0 and snr.config_hash() != plain


def test_8bit_adamw_says_what_it_needs_where_it_cannot_run(spec_for):
    from personalize.errors import ConfigError
    from personalize.optim import make_optimizer

    stage = spec_for("dreambooth", stage_overrides={"optimizer": "adamw8bit"}).method.stages[0]
    params = [torch.nn.Parameter(torch.zeros(3))]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"stage finetune(.|\n)*needs bitsandbytes(.|\n)*pip install bitsandbytes"):
            make_optimizer(params, stage)
    else:
        with pytest.raises(ConfigError, match="runs on CUDA GPUs only"):
            make_optimizer(params, stage)
