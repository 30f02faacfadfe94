"""The VAE's blocks, channels-last, with diffusers' attribute names.

* :class:`VAEAttention`: the single-head spatial self-attention of the mid blocks (GroupNorm, ``to_q/to_k/to_v``,
  ``to_out.0``, residual). The original checkpoints store its projections as 1x1 convs; they are squeezed to
  Linear weights at conversion.
* :class:`DownEncoderBlock2D`, :class:`UNetMidBlock2D`, :class:`UpDecoderBlock2D`: the per-frame KL-f8 blocks of
  the encoder and of the image decoder.
* :class:`MidBlockTemporalDecoder`, :class:`UpBlockTemporalDecoder`: the temporal decoder's blocks, built from
  :class:`svd_jax.layers.SpatioTemporalResBlock` with the temporal branch weighted by ``sigmoid(mix_factor)``.

Per-frame tensors are ``[N, H, W, C]``; the temporal blocks take ``[B*F, H, W, C]`` plus ``num_frames``.
"""

from __future__ import annotations

from flax import nnx

from svd_jax.layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, SpatioTemporalResBlock, Upsample2D
from svd_jax.policy import Policy

# diffusers' VAE encoder pads only right and bottom before its stride-2 conv (the original code does the same).
ENCODER_DOWNSAMPLE_PADDING = ((0, 1), (0, 1))


class VAEAttention(Attention):
    """diffusers ``Attention(channels, heads=1, dim_head=channels, norm_num_groups=groups, bias=True,
    residual_connection=True)`` on ``[N, H, W, C]``: GroupNorm, attention over the H*W positions of each image,
    ``to_out.0``, plus the input."""

    def __init__(self, channels: int, groups: int, eps: float, policy: Policy, rngs: nnx.Rngs):
        super().__init__(channels, 1, channels, policy, rngs, bias=True)
        self.group_norm = GroupNorm(channels, groups, eps, policy, rngs)

    def __call__(self, x):
        n, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(n, h * w, c)
        return x + super().__call__(tokens).reshape(n, h, w, c)


class DownEncoderBlock2D(nnx.Module):
    """``resnets`` then, except in the last block, ``downsamplers.0`` (stride 2, padded right/bottom)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_downsample: bool, groups: int,
                 eps: float, policy: Policy, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, eps, policy, rngs, groups)
            for i in range(num_layers)
        ])
        self.downsamplers = (nnx.List([Downsample2D(out_channels, policy, rngs, padding=ENCODER_DOWNSAMPLE_PADDING)])
                             if add_downsample else None)

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers or ():
            x = downsampler(x)
        return x


class UNetMidBlock2D(nnx.Module):
    """diffusers ``UNetMidBlock2D`` as the VAE builds it: ``resnets.0``, ``attentions.0``, ``resnets.1``."""

    def __init__(self, channels: int, groups: int, eps: float, policy: Policy, rngs: nnx.Rngs):
        self.attentions = nnx.List([VAEAttention(channels, groups, eps, policy, rngs)])
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, None, eps, policy, rngs, groups) for _ in range(2)])

    def __call__(self, x):
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class UpDecoderBlock2D(nnx.Module):
    """``resnets`` then, except in the last block, ``upsamplers.0`` (nearest x2, conv 3x3)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool, groups: int,
                 eps: float, policy: Policy, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, eps, policy, rngs, groups)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, policy, rngs)]) if add_upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for upsampler in self.upsamplers or ():
            x = upsampler(x)
        return x


def _video_resblock(in_channels: int, out_channels: int, eps: float, temporal_eps: float, policy: Policy,
                    rngs: nnx.Rngs) -> SpatioTemporalResBlock:
    """The decoder's resblock: no time embedding; ``sigmoid(mix_factor)`` weights the temporal branch."""
    return SpatioTemporalResBlock(in_channels, out_channels, None, eps, temporal_eps, policy, rngs,
                                  temporal_gets_alpha=True)


class MidBlockTemporalDecoder(nnx.Module):
    """diffusers ``MidBlockTemporalDecoder``: ``num_layers`` resblocks and one attention.

    As upstream, the forward pass is ``resnets[0]``, then ``attentions[0]`` followed by ``resnets[1]``: with
    ``num_layers == 1`` the attention is never applied, and resblocks beyond the second are never applied
    (their weights still exist and are converted). SVD uses ``num_layers == 2``.
    """

    def __init__(self, channels: int, num_layers: int, eps: float, temporal_eps: float, policy: Policy,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([_video_resblock(channels, channels, eps, temporal_eps, policy, rngs)
                                 for _ in range(num_layers)])
        self.attentions = nnx.List([VAEAttention(channels, 32, eps, policy, rngs)])

    def __call__(self, x, num_frames: int):
        x = self.resnets[0](x, num_frames)
        for resnet, attn in zip(list(self.resnets)[1:], self.attentions):
            x = resnet(attn(x), num_frames)
        return x


class UpBlockTemporalDecoder(nnx.Module):
    """diffusers ``UpBlockTemporalDecoder``: spatio-temporal ``resnets``, then a purely spatial ``upsamplers.0``."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool, eps: float,
                 temporal_eps: float, policy: Policy, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            _video_resblock(in_channels if i == 0 else out_channels, out_channels, eps, temporal_eps, policy, rngs)
            for i in range(num_layers)
        ])
        self.upsamplers = nnx.List([Upsample2D(out_channels, policy, rngs)]) if add_upsample else None

    def __call__(self, x, num_frames: int):
        for resnet in self.resnets:
            x = resnet(x, num_frames)
        for upsampler in self.upsamplers or ():
            x = upsampler(x)
        return x
