"""Each block type of the spatio-temporal UNet against its diffusers module, parameters placed by the converter's
rule engine, float32, every parameter random. Frames > 1 so that temporal statistics and convolutions matter,
context with several tokens so that the cross-attention queries and keys matter."""

import jax
import numpy as np
import pytest
import torch
from diffusers.models.resnet import SpatioTemporalResBlock as TorchResBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel as TorchTransformer
from diffusers.models.unets import unet_3d_blocks as torch_blocks
from flax import nnx

from parity import max_rel_err, randomize
from svd_jax import Policy
from svd_jax.layers import SpatioTemporalResBlock
from svd_jax.unet_blocks import (DownBlockSpatioTemporal, TransformerSpatioTemporalModel, UNetMidBlockSpatioTemporal,
                                 UpBlockSpatioTemporal, transformer_settings)
from unet_helpers import filled_block

POLICY = Policy.float32()
B, F, H, W = 2, 3, 4, 6
TEMB, CROSS, TOKENS = 40, 24, 3


def _inputs(channels, seed, height=H, width=W, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B * F, channels, height, width, generator=g) * scale,
            torch.randn(B * F, TEMB, generator=g),
            torch.randn(B * F, TOKENS, CROSS, generator=g))


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def _run(block, *args):
    """The block under jit (so each test compiles once)."""
    graphdef, state = nnx.split(block)
    arrays = [a for a in args if not isinstance(a, int)]
    static = [a if isinstance(a, int) else None for a in args]

    def call(state, *arrays):
        it = iter(arrays)
        return nnx.merge(graphdef, state)(*(s if s is not None else next(it) for s in static))

    return jax.jit(call)(state, *arrays)


def _no_image_only():
    return torch.zeros(B, F)


@pytest.mark.parametrize("c_in,c_out,eps", [(32, 64, 1e-6), (64, 64, 1e-5)])
def test_spatio_temporal_res_block(c_in, c_out, eps):
    torch_block = randomize(TorchResBlock(c_in, c_out, TEMB, eps=eps), seed=c_in)
    block = filled_block(lambda r: SpatioTemporalResBlock(c_in, c_out, TEMB, eps, eps, POLICY, r), torch_block)
    # small inputs: the GroupNorm eps is then a visible part of the result
    x, temb, _ = _inputs(c_in, seed=1, scale=1e-3)
    with torch.no_grad():
        expected = torch_block(x, temb, image_only_indicator=_no_image_only())
    actual = _run(block, _nhwc(x), F, temb.numpy())
    assert max_rel_err(actual, _nhwc(expected)) <= 1e-5
    # without jit: the same numbers (the whole model is only ever run jitted in these tests, to keep them fast)
    eager = block(_nhwc(x), F, temb.numpy())
    assert max_rel_err(eager, _nhwc(expected)) <= 1e-5
    assert max_rel_err(eager, actual) <= 1e-6


def test_transformer_spatio_temporal_two_layers():
    c, heads = 64, 4
    torch_block = randomize(TorchTransformer(heads, c // heads, in_channels=c, num_layers=2, cross_attention_dim=CROSS),
                            seed=2)
    block = filled_block(lambda r: TransformerSpatioTemporalModel(c, heads, CROSS, 2, 1e-6, 1e-5, POLICY, r),
                         torch_block)
    x, _, context = _inputs(c, seed=3, height=5, width=3)
    with torch.no_grad():
        expected = torch_block(x, encoder_hidden_states=context, image_only_indicator=_no_image_only()).sample
    actual = _run(block, _nhwc(x), F, context.numpy())
    assert max_rel_err(actual, _nhwc(expected)) <= 1e-5


def _settings(heads, layers=1):
    return transformer_settings(heads, CROSS, layers, 1e-6, 1e-5)


@pytest.mark.parametrize("cross", [True, False])
def test_down_block(cross):
    c_in, c_out, heads = 32, 64, 2
    if cross:
        torch_block = torch_blocks.CrossAttnDownBlockSpatioTemporal(c_in, c_out, TEMB, num_layers=2,
                                                                    num_attention_heads=heads, cross_attention_dim=CROSS)
    else:
        torch_block = torch_blocks.DownBlockSpatioTemporal(c_in, c_out, TEMB, num_layers=2)
    randomize(torch_block, seed=4)
    eps = 1e-6 if cross else 1e-5
    block = filled_block(lambda r: DownBlockSpatioTemporal(c_in, c_out, TEMB, 2, eps, True, POLICY, r,
                                                           attention=_settings(heads) if cross else None), torch_block)
    x, temb, context = _inputs(c_in, seed=5)
    with torch.no_grad():
        kwargs = {"encoder_hidden_states": context} if cross else {}
        expected, expected_skips = torch_block(x, temb, image_only_indicator=_no_image_only(), **kwargs)
    actual, skips = _run(block, _nhwc(x), F, temb.numpy(), context.numpy())
    assert len(skips) == len(expected_skips) == 3
    assert max_rel_err(actual, _nhwc(expected)) <= 1e-5
    for got, want in zip(skips, expected_skips):
        assert max_rel_err(got, _nhwc(want)) <= 1e-5


def test_mid_block():
    c, heads = 64, 4
    torch_block = randomize(torch_blocks.UNetMidBlockSpatioTemporal(c, TEMB, num_attention_heads=heads,
                                                                    cross_attention_dim=CROSS), seed=6)
    block = filled_block(lambda r: UNetMidBlockSpatioTemporal(c, TEMB, 1e-5, _settings(heads), POLICY, r), torch_block)
    x, temb, context = _inputs(c, seed=7)
    with torch.no_grad():
        expected = torch_block(x, temb, encoder_hidden_states=context, image_only_indicator=_no_image_only())
    actual = _run(block, _nhwc(x), F, temb.numpy(), context.numpy())
    assert max_rel_err(actual, _nhwc(expected)) <= 1e-5


@pytest.mark.parametrize("cross", [True, False])
def test_up_block(cross):
    # like the first up block of a 2-level UNet (64 -> 64, skips 64 then 32) or the last one (64 -> 32)
    c_in, prev, c_out, heads = (32, 64, 64, 4) if not cross else (32, 64, 32, 2)
    skip_channels = [c_out, c_in]  # popped last-first: c_in is consumed by the last resnet
    cls = torch_blocks.CrossAttnUpBlockSpatioTemporal if cross else torch_blocks.UpBlockSpatioTemporal
    extra = {"num_attention_heads": heads, "cross_attention_dim": CROSS} if cross else {}
    torch_block = randomize(cls(in_channels=c_in, prev_output_channel=prev, out_channels=c_out, temb_channels=TEMB,
                                num_layers=2, add_upsample=not cross, **extra), seed=8)
    block = filled_block(lambda r: UpBlockSpatioTemporal(c_in, prev, c_out, TEMB, 2, 1e-6, not cross, POLICY, r,
                                                         attention=_settings(heads) if cross else None), torch_block)
    x, temb, context = _inputs(prev, seed=9)
    g = torch.Generator().manual_seed(10)
    skips = tuple(torch.randn(B * F, ch, H, W, generator=g) for ch in reversed(skip_channels))
    with torch.no_grad():
        kwargs = {"encoder_hidden_states": context} if cross else {}
        expected = torch_block(x, skips, temb, image_only_indicator=_no_image_only(), **kwargs)
    actual = _run(block, _nhwc(x), tuple(_nhwc(s) for s in skips), F, temb.numpy(), context.numpy())
    assert actual.shape == _nhwc(expected).shape
    assert max_rel_err(actual, _nhwc(expected)) <= 1e-5


def test_block_rejects_rows_that_are_not_whole_videos():
    block = nnx.eval_shape(lambda: TransformerSpatioTemporalModel(32, 2, CROSS, 1, 1e-6, 1e-5, POLICY, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="num_frames=4"):
        block(np.zeros((6, 2, 2, 32), np.float32), 4, np.zeros((6, 1, CROSS), np.float32))
