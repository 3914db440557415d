"""Attention capture on each architecture's layout (sd15; sd21's heads per block and linear projections): same
outputs as the default processor, maps are distributions, only selected layers."""

import pytest
import torch

from personalize.attention import CaptureSpec, attention_hooks
from personalize.models import TINY_ARCHS, tiny_unet


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def unet_and_inputs(request):
    torch.manual_seed(0)
    arch = TINY_ARCHS[request.param]
    unet = tiny_unet(arch).eval()
    return unet, torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, arch.text_width)


def test_capturing_changes_no_output(unet_and_inputs):
    unet, x, t, ctx = unet_and_inputs
    with torch.no_grad():
        reference = unet(x, t, ctx).sample
        with attention_hooks(unet, CaptureSpec()) as store:
            captured = unet(x, t, ctx).sample
            maps = store.take()
        with attention_hooks(unet, None, detach_start_token=True):
            detached = unet(x, t, ctx).sample
        after = unet(x, t, ctx).sample
    assert torch.allclose(captured, reference, atol=1e-5)
    assert torch.allclose(detached, reference, atol=1e-5)
    assert torch.equal(after, reference)  # processors restored
    assert len(maps) == 7


def test_maps_sum_to_one_over_keys_and_have_their_resolution(unet_and_inputs):
    unet, x, t, ctx = unet_and_inputs
    with torch.no_grad(), attention_hooks(unet, CaptureSpec()) as store:
        with store.recording(CaptureSpec(), (16, 16)) as maps:
            unet(x, t, ctx)
    for name, m in maps.items():
        assert m.shape[0] == 2 and m.shape[-1] == 77
        assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5)
        h, w = store.resolutions[name]
        assert h * w == m.shape[2]
    assert sorted({store.resolutions[n][0] for n in maps}) == [8, 16]


def test_only_selected_layers_are_stored(unet_and_inputs):
    unet, x, t, ctx = unet_and_inputs
    with torch.no_grad(), attention_hooks(unet, CaptureSpec()) as store:
        with store.recording(CaptureSpec(resolutions=(16,)), (16, 16)) as at16:
            unet(x, t, ctx)
        with store.recording(CaptureSpec(name_pattern=r"^down_blocks\.0\."), (16, 16)) as first:
            unet(x, t, ctx)
        with store.recording(None, (16, 16)) as nothing:
            unet(x, t, ctx)
    assert len(at16) == 3 and all(v.shape[2] == 256 for v in at16.values())
    assert list(first) == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
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
