"""Attention capture on each architecture's layout (sd15; sd21's heads per block and linear projections; sdxl's
several transformer layers per block, no attention in its first level): same outputs as the default processor,
maps are distributions, only selected layers."""

import pytest
import torch

from personalize.attention import CaptureSpec, attention_hooks
from personalize.models import TINY_ARCHS, tiny_unet

# per layout: the cross-attention layers, their latent sides at 16x16 latents, and the first attention level's
# layers (side, count, the first layer's name)
LAYOUT = {
    "sd15": (7, [8, 16], (16, 3, "down_blocks.0.attentions.0.transformer_blocks.0.attn2")),
    "sd21": (7, [8, 16], (16, 3, "down_blocks.0.attentions.0.transformer_blocks.0.attn2")),
    "sdxl": (11, [4, 8], (8, 3, "down_blocks.1.attentions.0.transformer_blocks.0.attn2")),
}


class SDXLConditioned(torch.nn.Module):
    """The tiny SDXL UNet called like the others: its pooled text and time ids fixed."""

    def __init__(self, unet, pooled_width: int):
        super().__init__()
        self.unet = unet
        self.extra = {"text_embeds": torch.randn(2, pooled_width), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}

    def forward(self, x, t, ctx):
        return self.unet(x, t, ctx, added_cond_kwargs=self.extra)


@pytest.fixture(scope="module", params=list(LAYOUT))
def unet_and_inputs(request):
    torch.manual_seed(0)
    arch = TINY_ARCHS[request.param]
    unet = tiny_unet(arch).eval()
    inputs = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, arch.text_width + arch.text_width_2)
    call = SDXLConditioned(unet, arch.text_width_2) if arch.text_width_2 else unet
    return call, *inputs, LAYOUT[request.param]


def hooked(call):
    return call.unet if isinstance(call, SDXLConditioned) else call


def test_capturing_changes_no_output(unet_and_inputs):
    unet, x, t, ctx, (layers, _, _) = unet_and_inputs
    with torch.no_grad():
        reference = unet(x, t, ctx).sample
        with attention_hooks(hooked(unet), CaptureSpec()) as store:
            captured = unet(x, t, ctx).sample
            maps = store.take()
        with attention_hooks(hooked(unet), None, detach_start_token=True):
            detached = unet(x, t, ctx).sample
        after = unet(x, t, ctx).sample
    assert torch.allclose(captured, reference, atol=1e-5)
    assert torch.allclose(detached, reference, atol=1e-5)
    assert torch.equal(after, reference)  # processors restored
    assert len(maps) == layers


def test_maps_sum_to_one_over_keys_and_have_their_resolution(unet_and_inputs):
    unet, x, t, ctx, (_, sides, _) = unet_and_inputs
    with torch.no_grad(), attention_hooks(hooked(unet), CaptureSpec()) as store:
        with store.recording(CaptureSpec(), (16, 16)) as maps:
            unet(x, t, ctx)
    for name, m in maps.items():
        assert m.shape[0] == 2 and m.shape[-1] == 77
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)
        h, w = store.resolutions[name]
        assert h * w == m.shape[2]
    assert sorted({store.resolutions[n][0] for n in maps}) == sides


def test_only_selected_layers_are_stored(unet_and_inputs):
    unet, x, t, ctx, (_, _, (side, count, first_layer)) = unet_and_inputs
    with torch.no_grad(), attention_hooks(hooked(unet), CaptureSpec()) as store:
        with store.recording(CaptureSpec(resolutions=(side,)), (16, 16)) as at_side:
            unet(x, t, ctx)
        with store.recording(CaptureSpec(name_pattern="^" + first_layer.split(".attentions")[0] + r"\."), (16, 16)) as first:
            unet(x, t, ctx)
        with store.recording(None, (16, 16)) as nothing:
            unet(x, t, ctx)
    assert len(at_side) == count and all(v.shape[2] == side * side for v in at_side.values())
    assert list(first) == [first_layer]
    assert nothing == {}


def test_start_token_detach_stops_its_gradient_only():
    torch.manual_seed(0)
    unet = tiny_unet()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([100])
    ctx = torch.randn(1, 77, 32, requires_grad=True)
    with attention_hooks(unet, None, detach_start_token=True):
        unet(x, t, ctx).sample.sum().backward()
    assert ctx.grad[0, 0].abs().sum() == 0
    assert ctx.grad[0, 1:].abs().sum() > 0
