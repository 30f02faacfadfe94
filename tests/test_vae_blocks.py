"""Each VAE block type on its own against its diffusers twin, float32, random weights (every parameter)."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.resnet import SpatioTemporalResBlock as TorchSpatioTemporalResBlock
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D as TorchDownEncoderBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D as TorchUNetMidBlock2D
from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D as TorchUpDecoderBlock2D
from diffusers.models.unets.unet_3d_blocks import MidBlockTemporalDecoder as TorchMidBlockTemporalDecoder
from diffusers.models.unets.unet_3d_blocks import UpBlockTemporalDecoder as TorchUpBlockTemporalDecoder
from flax import nnx

from parity import max_rel_err, nchw_to_nhwc, randomize
from svd_jax import Policy
from svd_jax import vae_blocks
from svd_jax.layers import SpatioTemporalResBlock
from vae_helpers import jitted, load_block

BLOCK_TOL = 1e-5
POLICY = Policy.float32()


def build(cls, *args):
    """A constructor for ``load_block``, which builds abstractly (random init of real arrays is slow on CPU)."""
    return lambda: cls(*args, POLICY, nnx.Rngs(0))


def sample(n, c, h, w, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def compare(make_block, torch_block, x, *args, torch_kwargs=None, seed=0):
    """``args`` (e.g. num_frames) are static arguments of the NNX block."""
    randomize(torch_block, seed=seed)
    block = load_block(make_block, torch_block)
    with torch.no_grad():
        expected = torch_block(x, **(torch_kwargs or {}))
    static = tuple(range(1, 1 + len(args)))
    actual = jitted(block, static_argnums=static)(nchw_to_nhwc(x), *args)
    err = max_rel_err(actual, nchw_to_nhwc(expected))
    assert err <= BLOCK_TOL, err
    return err


def indicator(batch, frames):
    return torch.zeros(batch, frames)


@pytest.mark.parametrize("channels,hw", [(64, (5, 3))])
def test_mid_attention(channels, hw):
    torch_block = TorchAttention(query_dim=channels, heads=1, dim_head=channels, eps=1e-6, norm_num_groups=32,
                                 bias=True, residual_connection=True, upcast_softmax=True)
    block = build(vae_blocks.VAEAttention, channels, 32, 1e-6)
    compare(block, torch_block, sample(3, channels, *hw, seed=channels))


@pytest.mark.parametrize("in_ch,out_ch,frames", [(64, 32, 5), (32, 64, 1)])
def test_decoder_resblock(in_ch, out_ch, frames):
    torch_block = TorchSpatioTemporalResBlock(in_ch, out_ch, temb_channels=None, eps=1e-6, temporal_eps=1e-5,
                                              merge_factor=0.0, merge_strategy="learned",
                                              switch_spatial_to_temporal_mix=True)
    block = lambda: SpatioTemporalResBlock(in_ch, out_ch, None, 1e-6, 1e-5, POLICY, nnx.Rngs(0),  # noqa: E731
                                           temporal_gets_alpha=True)
    x = sample(2 * frames, in_ch, 4, 6, seed=frames)
    compare(block, torch_block, x, frames, torch_kwargs=dict(image_only_indicator=indicator(2, frames)), seed=in_ch)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_mid_block_temporal_decoder(num_layers):
    """Upstream applies resnets[0], attentions[0], resnets[1] only: 1 layer skips the attention, 3 skips resnets[2]."""
    torch_block = TorchMidBlockTemporalDecoder(64, 64, attention_head_dim=64, num_layers=num_layers)
    block = build(vae_blocks.MidBlockTemporalDecoder, 64, num_layers, 1e-6, 1e-5)
    x = sample(6, 64, 3, 4, seed=num_layers)
    compare(block, torch_block, x, 3, torch_kwargs=dict(image_only_indicator=indicator(2, 3)), seed=num_layers)


@pytest.mark.parametrize("in_ch,out_ch,upsample", [(64, 32, True)])
def test_up_block_temporal_decoder(in_ch, out_ch, upsample):
    torch_block = TorchUpBlockTemporalDecoder(in_ch, out_ch, num_layers=2, add_upsample=upsample)
    block = build(vae_blocks.UpBlockTemporalDecoder, in_ch, out_ch, 2, upsample, 1e-6, 1e-5)
    x = sample(4, in_ch, 3, 5, seed=in_ch)
    compare(block, torch_block, x, 4, torch_kwargs=dict(image_only_indicator=indicator(1, 4)))


@pytest.mark.parametrize("in_ch,out_ch,downsample,hw", [(32, 64, True, (7, 6))])
def test_down_encoder_block(in_ch, out_ch, downsample, hw):
    """The encoder's stride-2 conv pads only right/bottom; odd sizes check that."""
    torch_block = TorchDownEncoderBlock2D(in_ch, out_ch, num_layers=2, resnet_eps=1e-6, resnet_groups=32,
                                          add_downsample=downsample, downsample_padding=0)
    block = build(vae_blocks.DownEncoderBlock2D, in_ch, out_ch, 2, downsample, 32, 1e-6)
    compare(block, torch_block, sample(2, in_ch, *hw, seed=out_ch))


def test_mid_block_2d():
    torch_block = TorchUNetMidBlock2D(in_channels=64, temb_channels=None, resnet_eps=1e-6, resnet_groups=16,
                                      attention_head_dim=64, add_attention=True)
    block = build(vae_blocks.UNetMidBlock2D, 64, 16, 1e-6)
    compare(block, torch_block, sample(2, 64, 3, 5))


@pytest.mark.parametrize("in_ch,out_ch,upsample", [(64, 32, True)])
def test_up_decoder_block(in_ch, out_ch, upsample):
    torch_block = TorchUpDecoderBlock2D(in_ch, out_ch, num_layers=3, resnet_eps=1e-6, resnet_groups=32,
                                        add_upsample=upsample)
    block = build(vae_blocks.UpDecoderBlock2D, in_ch, out_ch, 3, upsample, 32, 1e-6)
    compare(block, torch_block, sample(2, in_ch, 3, 4, seed=in_ch))


def test_blocks_hold_exactly_the_upstream_parameters():
    """No parameter more or less than upstream, including the unused mid attention of a 1-layer decoder."""
    torch_block = TorchMidBlockTemporalDecoder(32, 32, attention_head_dim=32, num_layers=1)
    block = build(vae_blocks.MidBlockTemporalDecoder, 32, 1, 1e-6, 1e-5)
    loaded = load_block(block, torch_block)  # strict: raises on a missing or extra key
    np.testing.assert_array_equal(np.asarray(loaded.attentions[0].to_q.kernel[...]),
                                  torch_block.attentions[0].to_q.weight.detach().numpy().T)
