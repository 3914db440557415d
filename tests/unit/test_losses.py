"""Every loss term on small hand-made tensors: zero when the sides agree, hand-computed values, and gradient
only where the paper / official code puts it."""

import math
import statistics

import pytest
import torch

from personalize.losses import (
    LOSS_TERMS,
    AttnMeanVarParams,
    CoreParams,
    DiffusionParams,
    DisenDiffParams,
    NoParams,
    attn_mean_var_reg,
    core_context_attention,
    core_context_embedding,
    diffusion_loss,
    disendiff_binding,
    disendiff_separation,
    gaussian_kernel,
    min_snr_weights,
    minmax_normalize,
    prior_preservation_loss,
    smooth,
    soft_iou,
    suppress,
)
from personalize.step_record import ContextRecord, StepRecord, TokenRoles

K = 6  # keys (tokens) in the hand-made maps


def record(**kw) -> StepRecord:
    base = dict(timesteps=torch.zeros(2), is_prior=torch.tensor([False, False]),
                tokens=TokenRoles(torch.tensor([[1], [1]]), 1, torch.tensor([[2], [2]])))
    base.update(kw)
    return StepRecord(**base)


def test_every_registered_term_is_tested_here():
    assert set(LOSS_TERMS) == {"diffusion", "prior_preservation", "attn_mean_var_reg", "core_context_embedding",
                               "core_context_attention", "disendiff_binding", "disendiff_separation"}


# ---------------------------------------------------------------------------------------------- denoising


def test_diffusion_loss_zero_hand_value_and_mask():
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert diffusion_loss(record(model_pred=target, target=target), DiffusionParams()) == 0
    assert diffusion_loss(record(model_pred=pred, target=target), DiffusionParams()).item() == pytest.approx((1 + 1) / 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 1.0], [1.0, 1.0]]]])
    # per-sample masked means: sample 0 -> 1, sample 1 -> 0; batch mean 0.5
    assert diffusion_loss(record(model_pred=pred, target=target, loss_mask=mask), DiffusionParams()).item() == pytest.approx(0.5)


def test_diffusion_over_instances_only_and_prior_term_over_priors_only():
    target = torch.zeros(2, 1, 1, 1)
    pred = torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    rec = record(model_pred=pred, target=target, is_prior=torch.tensor([False, True]))
    assert diffusion_loss(rec, DiffusionParams(samples="instance")).item() == pytest.approx(1.0)
    assert diffusion_loss(rec, DiffusionParams(samples="all")).item() == pytest.approx(5.0)
    assert prior_preservation_loss(rec, NoParams()).item() == pytest.approx(9.0)


def test_min_snr_weights_for_epsilon_and_v_targets():
    snr = torch.tensor([0.5, 5.0, 20.0])
    assert min_snr_weights(snr, 5.0, "epsilon").tolist() == pytest.approx([1.0, 1.0, 0.25])  # min(snr, 5) / snr
    assert min_snr_weights(snr, 5.0, "v_prediction").tolist() == pytest.approx([0.5 / 1.5, 5 / 6, 5 / 21])  # / (snr + 1)


def test_diffusion_loss_with_min_snr_weights_each_sample_before_the_mean():
    target = torch.zeros(2, 1, 1, 1)
    pred = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # squared errors 1 and 4
    rec = record(model_pred=pred, target=target, snr=torch.tensor([2.0, 10.0]))
    # gamma 5: weights 1 (SNR 2 < 5) and 0.5 (5 / 10): (1 * 1 + 4 * 0.5) / 2
    assert diffusion_loss(rec, DiffusionParams(min_snr_gamma=5.0)).item() == pytest.approx(1.5)
    rec.prediction_type = "v_prediction"  # weights 2 / 3 and 5 / 11
    assert diffusion_loss(rec, DiffusionParams(min_snr_gamma=5.0)).item() == pytest.approx((2 / 3 + 4 * 5 / 11) / 2)
    assert diffusion_loss(rec, DiffusionParams()).item() == pytest.approx(2.5)  # unset: unweighted


# ---------------------------------------------------------------------------------------------- AttnDreamBooth


def adb_maps(v: list[float], c: list[float], requires_grad=False) -> torch.Tensor:
    """(B=2, heads=1, Q=4, K): token 1 ([V]) and token 2 (class) columns as given, other keys uniform filler."""
    m = torch.full((2, 1, 4, K), 0.1)
    m[:, 0, :, 1] = torch.tensor(v)
    m[:, 0, :, 2] = torch.tensor(c)
    return m.requires_grad_(requires_grad)


def test_attn_mean_var_zero_when_the_maps_agree():
    maps = adb_maps([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    assert attn_mean_var_reg(record(attention={"l1": maps, "l2": maps}), AttnMeanVarParams(mu=2, var=5)) == 0


def test_attn_mean_var_hand_value_summed_over_batch_averaged_over_layers():
    # [V]: [1,0,0,0] -> mean 0.25, unbiased var ((.75)^2 + 3 (.25)^2) / 3 = 0.25
    # class: [.25]*4 -> mean 0.25, var 0.   per sample: mu*0 + var_w*(0.25)^2
    maps = adb_maps([1.0, 0.0, 0.0, 0.0], [0.25] * 4)
    flat = adb_maps([0.25] * 4, [0.25] * 4)
    value = attn_mean_var_reg(record(attention={"a": maps, "b": flat}), AttnMeanVarParams(mu=2.0, var=5.0))
    per_sample = 5.0 * 0.25**2
    assert value.item() == pytest.approx((2 * per_sample + 0.0) / 2)  # sum over 2 samples, mean over 2 layers
    mean_gap = adb_maps([0.5] * 4, [0.25] * 4)
    assert attn_mean_var_reg(record(attention={"a": mean_gap}), AttnMeanVarParams(mu=0.1, var=0.0)).item() == pytest.approx(
        2 * 0.1 * 0.25**2)


def test_attn_mean_var_has_no_stop_gradient():
    maps = adb_maps([1.0, 0.0, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1], requires_grad=True)
    attn_mean_var_reg(record(attention={"a": maps}), AttnMeanVarParams(mu=1.0, var=1.0)).backward()
    grad = maps.grad[0, 0]
    assert grad[:, 1].abs().sum() > 0 and grad[:, 2].abs().sum() > 0  # both [V] and class maps get gradient
    assert grad[:, [0, 3, 4, 5]].abs().sum() == 0


def test_attn_mean_var_averages_over_every_placeholder_vector():
    # placeholder of 2 vectors at tokens 1, 2; the class right after it, at token 3
    v0, v1, c = [1.0, 0.0, 0.0, 0.0], [0.5] * 4, [0.25] * 4
    maps = torch.full((2, 1, 4, K), 0.1)
    for pos, values in ((1, v0), (2, v1), (3, c)):
        maps[:, 0, :, pos] = torch.tensor(values)
    rec = record(attention={"a": maps}, tokens=TokenRoles(torch.tensor([[1], [1]]), 2, torch.tensor([[3], [3]])))

    def gap(v, c, mu=2.0, var=5.0):  # one vector's value, unbiased variance
        return mu * (statistics.mean(v) - statistics.mean(c)) ** 2 + var * (statistics.variance(v) - statistics.variance(c)) ** 2

    assert gap(v0, c) != gap(v1, c)
    expected = 2 * (gap(v0, c) + gap(v1, c)) / 2  # sum over 2 samples of the mean over the 2 vectors; one layer
    assert attn_mean_var_reg(rec, AttnMeanVarParams(mu=2.0, var=5.0)).item() == pytest.approx(expected)


def test_attn_mean_var_needs_the_class_after_the_placeholder():
    rec = record(attention={"a": adb_maps([0.1] * 4, [0.1] * 4)}, tokens=TokenRoles(torch.tensor([[1], [1]]), 1, torch.tensor([[-1], [-1]])))
    with pytest.raises(ValueError, match="placeholder followed by the super-category"):
        attn_mean_var_reg(rec, AttnMeanVarParams())


# ---------------------------------------------------------------------------------------------- CoRe


def context(target: torch.Tensor, reference: torch.Tensor, target_maps=None, reference_maps=None) -> ContextRecord:
    m = target.shape[0]
    return ContextRecord("t", "r", target[None], reference[None], torch.arange(m), torch.arange(m),
                         target_maps or {}, reference_maps or {})


def test_cer_zero_when_outputs_agree_and_hand_values_of_both_variants():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert core_context_embedding(record(context=context(a, a.clone())), CoreParams()) == pytest.approx(0, abs=1e-7)
    target = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # two context tokens, two channels
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # paper (Eq. 3), per-token cosine over channels: token 0 -> 1, token 1 -> 1/sqrt(2); loss = mean(1 - cos)
    paper = ((1 - 1) + (1 - 1 / math.sqrt(2))) / 2
    # official code, cosine along the token axis per channel: ch 0 ([1,1] vs [1,0]) -> 1/sqrt(2); ch 1 ([0,1] vs [0,1]) -> 1
    official = 1 - (1 / math.sqrt(2) + 1) / 2
    rec = record(context=context(target, reference))
    assert core_context_embedding(rec, CoreParams(variant="paper")).item() == pytest.approx(paper)
    assert core_context_embedding(rec, CoreParams(variant="official")).item() == pytest.approx(official)


def test_cer_gradient_flows_into_the_target_only():
    target = torch.tensor([[1.0, 0.5], [0.2, 1.0]], requires_grad=True)
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    core_context_embedding(record(context=context(target, reference)), CoreParams()).backward()
    assert target.grad.abs().sum() > 0
    # the reference is computed under no_grad by the step engine; the term itself never detaches the target
    assert reference.grad is not None


def car_maps(means_per_token: list[float]) -> torch.Tensor:
    """(B=2, heads=2, Q=2, K=len): every head and pixel holds the token's value, so its mean is that value."""
    t = torch.tensor(means_per_token)
    return t.view(1, 1, 1, -1).expand(2, 2, 2, -1).clone()


def test_car_zero_when_the_maps_agree():
    m = car_maps([0.2, 0.3, 0.5])
    rec = record(context=context(torch.zeros(3, 2), torch.zeros(3, 2), {"l": m}, {"l": m.clone()}))
    assert core_context_attention(rec, CoreParams()) == 0
    assert core_context_attention(rec, CoreParams(variant="paper")) == 0


def test_car_hand_values_official_sums_over_batch_per_layer_paper_squares_the_layer_mean():
    # layer a: target means [0.2, 0.4, 0.4] vs reference [0.2, 0.2, 0.6]: squared diffs [0, .04, .04] -> mean .08/3
    # layer b: target equals reference.
    t_a, r_a = car_maps([0.2, 0.4, 0.4]), car_maps([0.2, 0.2, 0.6])
    t_b = car_maps([0.3, 0.3, 0.4])
    rec = record(context=context(torch.zeros(3, 2), torch.zeros(3, 2), {"a": t_a, "b": t_b}, {"a": r_a, "b": t_b.clone()}))
    official = (2 * (0.08 / 3) + 2 * 0.0) / 2  # sum over batch of 2, mean over 2 layers
    assert core_context_attention(rec, CoreParams(variant="official")).item() == pytest.approx(official)
    # paper: layer-averaged means: target [.25, .35, .4], reference [.25, .25, .5]: diffs^2 [0, .01, .01] -> .02/3
    assert core_context_attention(rec, CoreParams(variant="paper")).item() == pytest.approx(0.02 / 3)


def test_car_gradient_reaches_the_target_maps():
    t = car_maps([0.2, 0.4, 0.4]).requires_grad_(True)
    rec = record(context=context(torch.zeros(3, 2), torch.zeros(3, 2), {"a": t}, {"a": car_maps([0.2, 0.2, 0.6])}))
    core_context_attention(rec, CoreParams()).backward()
    assert t.grad[..., 1:].abs().sum() > 0 and t.grad[..., 0].abs().sum() == 0


# ---------------------------------------------------------------------------------------------- DisenDiff


def test_gaussian_kernel_is_the_attend_and_excite_variant():
    k = gaussian_kernel(3, 0.5)
    one_d = torch.tensor([0.2119, 0.5761, 0.2119])
    assert torch.allclose(k, torch.outer(one_d, one_d), atol=2e-4)
    assert k.sum().item() == pytest.approx(1.0)
    assert k[1, 1] == k.max() and torch.equal(k, k.T)


def test_smoothing_keeps_a_constant_map_and_blurs_a_spike():
    flat = torch.full((1, 4, 4), 0.3)
    assert torch.allclose(smooth(flat, gaussian_kernel()), flat)
    spike = torch.zeros(1, 5, 5)
    spike[0, 2, 2] = 1.0
    out = smooth(spike, gaussian_kernel())
    assert out[0, 2, 2].item() == pytest.approx(0.5761**2, abs=1e-3) and out[0, 2, 1] > 0 and out[0, 0, 0] == 0


def test_minmax_normalisation_and_suppression():
    m = torch.tensor([[[2.0, 4.0], [6.0, 6.0]]])
    assert torch.allclose(minmax_normalize(m), torch.tensor([[[0.0, 0.5], [1.0, 1.0]]]), atol=1e-6)
    assert torch.allclose(suppress(torch.tensor([0.5, 0.2])), torch.tensor([0.25, 0.04]))


def test_soft_iou_identity_and_disjoint():
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert soft_iou(a, a).item() == pytest.approx(1.0)
    assert soft_iou(a, b).item() == pytest.approx(1 / (4 + 1))


def disen_record(mod1, cls1, mod2, cls2, requires_grad=False) -> tuple[StepRecord, torch.Tensor]:
    """One sample, one layer, one head, a 2x2 map (Q=4); tokens: <new1>=1, cat=2, <new2>=3, dog=4."""
    return subjects_record([(mod1, cls1), (mod2, cls2)], requires_grad)


def subjects_record(subjects, requires_grad=False) -> tuple[StepRecord, torch.Tensor]:
    """Like disen_record for any number of (modifier, class) map pairs: subject s at tokens 2s+1 and 2s+2."""
    m = torch.zeros(1, 1, 4, 2 * len(subjects) + 2)
    for s, (mod, cls) in enumerate(subjects):
        m[0, 0, :, 2 * s + 1] = torch.tensor(mod)
        m[0, 0, :, 2 * s + 2] = torch.tensor(cls)
    m.requires_grad_(requires_grad)
    positions = torch.arange(len(subjects))[None] * 2
    rec = StepRecord(timesteps=torch.zeros(1), is_prior=torch.tensor([False]),
                     tokens=TokenRoles(positions + 1, 1, positions + 2),
                     model_pred=torch.zeros(1, 1, 2, 2), attention={"l": m}, attention_resolution={"l": (2, 2)})
    return rec, m


IDENTITY_SMOOTHING = DisenDiffParams(resolution=2, kernel_size=1)


def test_binding_hand_value():
    # after min-max (already 0/1) and a 1x1 kernel: modifier [0,1,0,0], class [0,1,0,1] (suppression keeps 0/1)
    # IoU = (1 + 1) / ((1 + 2) - 1 + 1) = 2/3 per subject -> binding = 2 * (1 - 2/3)
    rec, _ = disen_record([0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0], [0, 1, 0, 1])
    assert disendiff_binding(rec, IDENTITY_SMOOTHING).item() == pytest.approx(2 * (1 - 2 / 3))
    same, _ = disen_record([0, 1, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0])
    assert disendiff_binding(same, IDENTITY_SMOOTHING).item() == pytest.approx(0.0, abs=1e-6)


def test_separation_hand_value_and_zero_for_disjoint_classes():
    rec, _ = disen_record([0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1])
    # classes [0,1,0,1] and [0,0,0,1]: IoU = (1 + 1) / (3 - 1 + 1) = 2/3
    assert disendiff_separation(rec, IDENTITY_SMOOTHING).item() == pytest.approx(2 / 3)
    apart, _ = disen_record([1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1])
    assert disendiff_separation(apart, IDENTITY_SMOOTHING).item() == pytest.approx(1 / (4 + 1))  # only the +1 smoothing


def test_separation_is_the_mean_over_subject_pairs():
    classes = [[0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 0]]  # 0/1 maps: unchanged by min-max, a 1x1 kernel, squaring

    def iou(a, b):  # (intersection + 1) / (union + 1)
        inter = sum(x * y for x, y in zip(a, b))
        return (inter + 1) / (sum(a) + sum(b) - inter + 1)

    pairs = [iou(classes[i], classes[j]) for i in range(3) for j in range(i + 1, 3)]  # 2/3, 1/2, 1/4
    rec, _ = subjects_record([([1, 0, 0, 0], c) for c in classes])
    assert disendiff_separation(rec, IDENTITY_SMOOTHING).item() == pytest.approx(sum(pairs) / 3)


def test_binding_detaches_the_class_map_and_separation_does_not():
    values = ([0.1, 0.9, 0.3, 0.2], [0.2, 0.8, 0.1, 0.7], [0.6, 0.1, 0.9, 0.2], [0.3, 0.2, 0.8, 0.4])
    rec, m = disen_record(*values, requires_grad=True)
    disendiff_binding(rec, DisenDiffParams(resolution=2)).backward()
    g = m.grad[0, 0]
    assert g[:, 1].abs().sum() > 0 and g[:, 3].abs().sum() > 0  # modifiers
    assert g[:, 2].abs().sum() == 0 and g[:, 4].abs().sum() == 0  # classes: stop-gradient
    rec, m = disen_record(*values, requires_grad=True)
    disendiff_separation(rec, DisenDiffParams(resolution=2)).backward()
    g = m.grad[0, 0]
    assert g[:, 2].abs().sum() > 0 and g[:, 4].abs().sum() > 0
    assert g[:, 1].abs().sum() == 0 and g[:, 3].abs().sum() == 0


def test_disendiff_skips_samples_without_the_modifiers_and_names_missing_resolutions():
    rec, _ = disen_record([0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 0], [0, 1, 0, 1])
    rec.tokens = TokenRoles(torch.tensor([[-1, -1]]), 1, torch.tensor([[-1, -1]]))  # a class-prior sample
    assert disendiff_binding(rec, IDENTITY_SMOOTHING).item() == 0
    with pytest.raises(ValueError, match=r"no cross-attention maps at 16x16; the model has \[2\]"):
        disendiff_binding(rec, DisenDiffParams(resolution=16))
