"""Loss terms: pure functions of one step's record, each with a parameter schema and declared needs.

Where a paper and its released code disagree, the term says which one it implements; CoRe's two
regularisers implement both (`variant: official | paper`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from personalize.attention import CaptureSpec
from personalize.step_record import Needs, StepRecord

if TYPE_CHECKING:
    from personalize.method_spec import LossSpec


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class LossTerm:
    name: str
    fn: Callable[[StepRecord, Any], torch.Tensor]
    params: type[BaseModel]
    needs: Callable[[Any], Needs]
    summary: str


LOSS_TERMS: dict[str, LossTerm] = {}


def register(name: str, params: type[BaseModel], needs: Callable[[Any], Needs], summary: str):
    def wrap(fn):
        LOSS_TERMS[name] = LossTerm(name, fn, params, needs, summary)
        return fn

    return wrap


def validate_loss_params(term: str, params: dict[str, Any]) -> BaseModel:
    if term not in LOSS_TERMS:
        raise ValueError(f"unknown loss term {term!r}; available: {', '.join(sorted(LOSS_TERMS))}")
    try:
        return LOSS_TERMS[term].params.model_validate(params)
    except ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"loss {term!r}: {details}") from None


def term_needs(term: str, params: dict[str, Any]) -> Needs:
    spec = LOSS_TERMS[term]
    return spec.needs(spec.params.model_validate(params))


# --------------------------------------------------------------------------------------------
# Denoising losses


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                    reduction: str = "mean") -> torch.Tensor:
    """Squared error per sample: the mean over (masked-in) elements, or with `channel_sum` the released
    Custom Diffusion / DisenDiff reduction: summed over channels, averaged over (masked-in) pixels."""
    err = (pred.float() - target.float()) ** 2
    if reduction == "channel_sum":
        err = err.sum(1, keepdim=True)
    if mask is None:
        return err.flatten(1).mean(1)
    mask = mask.expand_as(err)
    return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)


class DiffusionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: Literal["instance", "all"] = "instance"
    reduction: Literal["mean", "channel_sum"] = "mean"
    min_snr_gamma: float | None = Field(default=None, gt=0)  # Hang et al. 2023: each sample weighted by min(SNR, gamma)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, as diffusers' training scripts apply them): min(SNR, gamma) / SNR
    for an epsilon target, min(SNR, gamma) / (SNR + 1) for a v target (whose MSE is (SNR + 1) times epsilon's)."""
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


@register(
    "diffusion",
    DiffusionParams,
    lambda p: Needs(prediction=True),
    "epsilon/v-prediction MSE; per-sample masked mean (Custom Diffusion's random-rescale mask), then batch mean. "
    "samples: instance (DreamBooth-style separate prior term) or all (Custom Diffusion's one shared loss); "
    "reduction: mean, or channel_sum (the released CD/DisenDiff code: channels summed, C times the mean); "
    "min_snr_gamma: weight each sample by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction).",
)
def diffusion_loss(rec: StepRecord, p: DiffusionParams) -> torch.Tensor:
    per_sample = _per_sample_mse(rec.model_pred, rec.target, rec.loss_mask, p.reduction)
    if p.min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(rec.snr, p.min_snr_gamma, rec.prediction_type)
    if p.samples == "instance":
        per_sample = per_sample[~rec.is_prior]
    return per_sample.mean() if per_sample.numel() else rec.model_pred.sum() * 0.0


@register(
    "prior_preservation",
    NoParams,
    lambda p: Needs(prediction=True),
    "DreamBooth prior preservation: MSE on the class-prior half of the batch (weight = lambda).",
)
def prior_preservation_loss(rec: StepRecord, p: NoParams) -> torch.Tensor:
    prior = rec.is_prior
    if not prior.any():
        return rec.model_pred.sum() * 0.0
    return _per_sample_mse(rec.model_pred[prior], rec.target[prior], None).mean()


# --------------------------------------------------------------------------------------------
# AttnDreamBooth: cross-attention mean/variance regulariser


class AttnMeanVarParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(default=1.0, ge=0)
    var: float = Field(default=0.0, ge=0)


def _token_maps(maps: torch.Tensor, samples: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """maps (B, heads, Q, K) -> (n, heads, Q): each selected sample's map of the token at its position."""
    return maps[samples, :, :, positions[samples]]


@register(
    "attn_mean_var_reg",
    AttnMeanVarParams,
    lambda p: Needs(prediction=True, capture=CaptureSpec(), single_token_class=True),
    "AttnDreamBooth (official code): sum over batch, mean over all cross-attention layers of "
    "mu*(mean([V]) - mean(cat))^2 + var*(var([V]) - var(cat))^2, averaged over the placeholder's vectors (each "
    "compared with the super-category token); mean and unbiased variance over heads and pixels jointly; no "
    "stop-gradient.",
)
def attn_mean_var_reg(rec: StepRecord, p: AttnMeanVarParams) -> torch.Tensor:
    """The official code takes `F.mse_loss` of the statistics of the n placeholder vectors against the
    super-category token's repeated n times, i.e. the mean over the vectors of the squared gaps."""
    v_pos, c_pos = rec.tokens.placeholder[:, 0], rec.tokens.super_category[:, 0]
    samples = ((v_pos >= 0) & (c_pos >= 0)).nonzero().flatten()
    if not rec.attention:
        raise ValueError("attn_mean_var_reg got no cross-attention maps (capture was not installed)")
    if samples.numel() == 0:
        raise ValueError("attn_mean_var_reg needs prompts holding the placeholder followed by the super-category")
    vectors = rec.tokens.placeholder_len
    total = 0.0
    for maps in rec.attention.values():
        c = _token_maps(maps, samples, c_pos).flatten(1).float()
        gaps = 0.0
        for k in range(vectors):  # the placeholder's vectors sit at consecutive positions
            v = _token_maps(maps, samples, v_pos + k).flatten(1).float()
            gaps = gaps + p.mu * (v.mean(1) - c.mean(1)) ** 2 + p.var * (v.var(1) - c.var(1)) ** 2
        total = total + (gaps / vectors).sum()
    return total / len(rec.attention)


# --------------------------------------------------------------------------------------------
# CoRe: context embedding and context attention regularisation


class CoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Literal["official", "paper"] = "official"


@register(
    "core_context_embedding",
    CoreParams,
    lambda p: Needs(context=True, single_token_class=True),
    "CoRe CER. official: 1 - mean over channels of the cosine taken along the token axis (released code); "
    "paper (Eq. 3): mean over context tokens of 1 - per-token cosine. Context = SOT, prompt words, EOT; "
    "[V] and the super-category removed.",
)
def core_context_embedding(rec: StepRecord, p: CoreParams) -> torch.Tensor:
    ctx = rec.context
    target = ctx.target_embeds[0, ctx.target_keep].float()
    reference = ctx.reference_embeds[0, ctx.reference_keep].float()
    axis = 0 if p.variant == "official" else -1
    return (1.0 - F.cosine_similarity(target, reference, dim=axis)).mean()


def _token_means(maps: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, heads, Q, K) -> (B, m): each kept token's attention mean over heads and pixels."""
    return maps.float().mean(dim=(1, 2))[:, keep]


@register(
    "core_context_attention",
    CoreParams,
    lambda p: Needs(context=True, context_capture=CaptureSpec(), single_token_class=True),
    "CoRe CAR. official: per layer, mean over context tokens of the squared difference of attention means "
    "(over heads and pixels), summed over the batch, averaged over layers; paper (Eq. 4): squared difference of "
    "the means over all cross-attention maps, averaged over tokens and batch. Reference side has no gradient.",
)
def core_context_attention(rec: StepRecord, p: CoreParams) -> torch.Tensor:
    ctx = rec.context
    layers = list(ctx.target_maps)
    if p.variant == "official":
        total = 0.0
        for layer in layers:
            diff = _token_means(ctx.target_maps[layer], ctx.target_keep) - _token_means(
                ctx.reference_maps[layer], ctx.reference_keep
            )
            total = total + (diff**2).mean(1).sum()
        return total / len(layers)
    target = torch.stack([_token_means(ctx.target_maps[name], ctx.target_keep) for name in layers]).mean(0)
    reference = torch.stack([_token_means(ctx.reference_maps[name], ctx.reference_keep) for name in layers]).mean(0)
    return ((target - reference) ** 2).mean()


# --------------------------------------------------------------------------------------------
# DisenDiff: attention calibration


class DisenDiffParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(default=16, ge=1)
    kernel_size: int = Field(default=3, ge=1)
    sigma: float = Field(default=0.5, gt=0)


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """2-D kernel from the Attend-and-Excite formula exp(-((x - mu) / (2 sigma))^2), normalised to sum 1.

    The (2 sigma) makes the effective standard deviation sigma * sqrt(2); DisenDiff's code uses this kernel.
    """
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    k = torch.outer(g, g)
    return (k / k.sum()).float()


def smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (N, h, w): reflect-pad, then depthwise convolution with the kernel."""
    pad = kernel.shape[-1] // 2
    x = F.pad(maps.unsqueeze(1), (pad, pad, pad, pad), mode="reflect")
    return F.conv2d(x, kernel.to(maps)[None, None]).squeeze(1)


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each (h, w) map scaled to [0, 1]."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low + eps)).view_as(maps)


def suppress(maps: torch.Tensor) -> torch.Tensor:
    """DisenDiff's suppression f_m(A) = A * A (sharpens the class-token map)."""
    return maps * maps


def soft_iou(a: torch.Tensor, b: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """(sum a*b + s) / (sum (a + b) - sum a*b + s) over the last two dims."""
    inter = (a * b).flatten(-2).sum(-1)
    union = (a + b).flatten(-2).sum(-1) - inter
    return (inter + smoothing) / (union + smoothing)


def disendiff_maps(rec: StepRecord, p: DisenDiffParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Processed maps of samples holding every subject: modifiers (n, S, h, w) and suppressed classes (n, S, h, w).
    Computed once per step and parameter set (both DisenDiff terms read them)."""
    key = ("disendiff", p.resolution, p.kernel_size, p.sigma)
    if key not in rec.cache:
        rec.cache[key] = _disendiff_maps(rec, p)
    return rec.cache[key]


def _disendiff_maps(rec: StepRecord, p: DisenDiffParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    layers = [k for k, (h, _) in rec.attention_resolution.items() if h == p.resolution and k in rec.attention]
    if not layers:
        have = sorted({h for h, _ in rec.attention_resolution.values()})
        raise ValueError(f"no cross-attention maps at {p.resolution}x{p.resolution}; the model has {have}")
    mods, classes = rec.tokens.placeholder, rec.tokens.super_category
    samples = ((mods >= 0).all(1) & (classes >= 0).all(1)).nonzero().flatten()
    if samples.numel() == 0:
        return None
    avg = torch.stack([rec.attention[name].float() for name in layers]).mean(dim=(0, 2))  # (B, Q, K)
    h = w = p.resolution
    kernel = gaussian_kernel(p.kernel_size, p.sigma)

    def take(pos: torch.Tensor) -> torch.Tensor:
        idx = pos[samples].to(avg.device)  # (n, S)
        m = torch.gather(avg[samples], 2, idx[:, None, :].expand(-1, avg.shape[1], -1))  # (n, Q, S)
        m = m.permute(0, 2, 1).reshape(-1, h, w)
        return smooth(minmax_normalize(m), kernel).view(len(samples), -1, h, w)

    return take(mods), suppress(take(classes))


def _disendiff_needs(p: DisenDiffParams) -> Needs:
    """Both DisenDiff terms read one resolution's maps of the main forward; a class must be one token."""
    return Needs(prediction=True, capture=CaptureSpec(resolutions=(p.resolution,)), single_token_class=True)


@register(
    "disendiff_binding",
    DisenDiffParams,
    _disendiff_needs,
    "DisenDiff L_bind (official code): sum over subjects of 1 - softIoU(stopgrad(f_m(G(class map))), G(modifier "
    "map)) on min-max normalised maps at one resolution, averaged over layers and heads; mean over samples.",
)
def disendiff_binding(rec: StepRecord, p: DisenDiffParams) -> torch.Tensor:
    maps = disendiff_maps(rec, p)
    if maps is None:
        return rec.model_pred.sum() * 0.0
    mods, classes = maps
    return (1.0 - soft_iou(classes.detach(), mods)).sum(1).mean()


@register(
    "disendiff_separation",
    DisenDiffParams,
    _disendiff_needs,
    "DisenDiff L_s&s (official code): softIoU between the suppressed, smoothed class maps of two subjects (no "
    "stop-gradient), minimised; with more subjects the mean over every pair; mean over samples.",
)
def disendiff_separation(rec: StepRecord, p: DisenDiffParams) -> torch.Tensor:
    """The official code has two subjects and so one pair: IoU(f_m(G(A_dog)), f_m(G(A_cat))). With more subjects the
    pairs are averaged, so the term keeps that one pair's scale whatever the number of subjects."""
    maps = disendiff_maps(rec, p)
    if maps is None:
        return rec.model_pred.sum() * 0.0
    _, classes = maps
    subjects = classes.shape[1]
    pairs = [soft_iou(classes[:, j], classes[:, i]) for i in range(subjects) for j in range(i + 1, subjects)]
    if not pairs:
        return classes.sum() * 0.0
    return torch.stack(pairs, 1).mean(1).mean()  # mean over pairs, then over samples


SD_LATENT_SIDE = 64  # SD 1.x / 2.x at 512 px: the latent side at which the papers give attention-map sides


def at_model_level(losses: dict[str, LossSpec], sdxl: bool, latent_side: int) -> dict[str, LossSpec]:
    """A stage's loss terms with their attention-map `resolution` on the model's levels. Map sides in the method
    files are SD 1.x / 2.x ones (DisenDiff's 16x16, a quarter of the latent side at 512 px) and are kept as they are
    on those models. SDXL's attention starts a level deeper, so the same units sit at the same fraction of its
    latent side: 32x32 at 1024 px (its innermost level), 4x4 for the tiny SDXL at 64 px."""
    if not sdxl:
        return losses
    return {name: spec.model_copy(update={"resolution": max(1, spec.params["resolution"] * latent_side // SD_LATENT_SIDE)})
            if isinstance(spec.params.get("resolution"), int) else spec for name, spec in losses.items()}


def combined_needs(losses: dict[str, Any]) -> Needs:
    """Needs of a stage: the union over its loss terms (LossSpec values or plain param dicts)."""
    needs = Needs()
    for term, spec in losses.items():
        params = spec.params if hasattr(spec, "params") else spec
        needs = needs.merge(term_needs(term, params))
    return needs
