"""The spatio-temporal UNet's transformer and its down, mid and up blocks, channels-last.

Spatial layers see frames folded into the batch, ``[B*F, H, W, C]`` (row ``b*F + f``); temporal layers unfold
them. Attribute paths mirror diffusers (``resnets.0``, ``attentions.0.temporal_transformer_blocks.0.ff_in``,
``downsamplers.0.conv``), so conversion needs no rename table.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from svd_jax.layers import (AlphaBlender, Attention, Downsample2D, FeedForward, GroupNorm, LayerNorm,
                            SpatioTemporalResBlock, TimestepEmbedding, Upsample2D, checkpointed_call, dense,
                            sinusoidal_embedding)
from svd_jax.policy import Policy


def check_frames(rows: int, num_frames: int, what: str) -> None:
    if num_frames < 1 or rows % num_frames:
        raise ValueError(f"{what}: {rows} rows are not a whole number of videos of num_frames={num_frames}")


class BasicTransformerBlock(nnx.Module):
    """Pre-norm spatial block on ``[N, S, C]``: self-attention, cross-attention to ``context``, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int, layer_norm_eps: float, policy: Policy,
                 rngs: nnx.Rngs):
        head_dim = dim // heads
        self.norm1 = LayerNorm(dim, layer_norm_eps, policy, rngs)
        self.attn1 = Attention(dim, heads, head_dim, policy, rngs)
        self.norm2 = LayerNorm(dim, layer_norm_eps, policy, rngs)
        self.attn2 = Attention(dim, heads, head_dim, policy, rngs, cross_attention_dim=cross_attention_dim)
        self.norm3 = LayerNorm(dim, layer_norm_eps, policy, rngs)
        self.ff = FeedForward(dim, policy, rngs)

    def __call__(self, x, context):
        """``x [N, S, C]``; ``context [Nc, L, D]``, each context row serving ``N / Nc`` consecutive rows of ``x``."""
        x = self.attn1(self.norm1(x)) + x
        # With one context token the cross-attention does not depend on its input's values (see Attention):
        # skip the norm it would discard.
        x = self.attn2(x if context.shape[1] == 1 else self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class TemporalBasicTransformerBlock(BasicTransformerBlock):
    """Attention over the frames at each spatial position (diffusers ``TemporalBasicTransformerBlock``, sgm
    ``VideoTransformerBlock``): a residual GEGLU ``ff_in``, then the spatial block's self-attention (now over
    time), cross-attention to the video's context and feed-forward."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int, layer_norm_eps: float, policy: Policy,
                 rngs: nnx.Rngs):
        super().__init__(dim, heads, cross_attention_dim, layer_norm_eps, policy, rngs)
        self.norm_in = LayerNorm(dim, layer_norm_eps, policy, rngs)
        self.ff_in = FeedForward(dim, policy, rngs, dim_out=dim)

    def __call__(self, x, num_frames: int, time_context):
        """``x [B*F, S, C]``, ``time_context [B, L, D]`` (one per video) -> ``[B*F, S, C]``."""
        bf, s, c = x.shape
        b = bf // num_frames
        h = x.reshape(b, num_frames, s, c).transpose(0, 2, 1, 3).reshape(b * s, num_frames, c)
        h = self.ff_in(self.norm_in(h)) + h
        h = super().__call__(h, time_context)
        return h.reshape(b, s, num_frames, c).transpose(0, 2, 1, 3).reshape(bf, s, c)


class TransformerSpatioTemporalModel(nnx.Module):
    """diffusers ``TransformerSpatioTemporalModel`` (sgm ``SpatialVideoTransformer``) on ``[B*F, H, W, C]``.

    GroupNorm, linear ``proj_in``; per layer a spatial block, then a temporal block on the spatial output plus a
    sinusoidal frame-position embedding, the two blended by ``time_mixer``; linear ``proj_out``; outer residual.
    The temporal cross-attention attends to the context of each video's first frame.
    """

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, num_layers: int, norm_eps: float,
                 layer_norm_eps: float, policy: Policy, rngs: nnx.Rngs, groups: int = 32):
        if channels % heads:
            raise ValueError(f"transformer channels {channels} are not divisible by num_attention_heads {heads}")
        self.channels = channels
        self.remat = policy.remat
        self.norm = GroupNorm(channels, groups, norm_eps, policy, rngs)
        self.proj_in = dense(channels, channels, policy, rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, cross_attention_dim, layer_norm_eps, policy, rngs)
            for _ in range(num_layers)])
        self.temporal_transformer_blocks = nnx.List([
            TemporalBasicTransformerBlock(channels, heads, cross_attention_dim, layer_norm_eps, policy, rngs)
            for _ in range(num_layers)])
        self.time_pos_embed = TimestepEmbedding(channels, 4 * channels, policy, rngs, out_dim=channels)
        self.time_mixer = AlphaBlender(policy, rngs)
        self.proj_out = dense(channels, channels, policy, rngs)

    def __call__(self, x, num_frames: int, context):
        """``x [B*F, H, W, C]``; ``context [B, L, D]`` (one per video, as the UNet carries it) or ``[B*F, L, D]``
        (one per frame, as diffusers passes it; the temporal blocks then use each video's first frame's)."""
        return checkpointed_call(self, TransformerSpatioTemporalModel._forward, x, num_frames, context)

    def _forward(self, x, num_frames: int, context):
        bf, height, width, c = x.shape
        check_frames(bf, num_frames, "TransformerSpatioTemporalModel")
        b, s = bf // num_frames, height * width
        if context.ndim != 3 or context.shape[0] not in (b, bf):
            raise ValueError(f"TransformerSpatioTemporalModel: context must be [{b}, L, D] or [{bf}, L, D], "
                             f"got {context.shape}")
        time_context = context if context.shape[0] == b else context[::num_frames]

        residual = x
        h = self.proj_in(self.norm(x).reshape(bf, s, c))
        frame_index = jnp.tile(jnp.arange(num_frames), b)
        position = self.time_pos_embed(sinusoidal_embedding(frame_index, c).astype(h.dtype))[:, None, :]
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            h = block(h, context)
            h_mix = temporal_block(h + position, num_frames, time_context)
            h = self.time_mixer(h, h_mix)
        return self.proj_out(h).reshape(bf, height, width, c) + residual


class _ResnetAttentionPairs(nnx.Module):
    """Shared construction of the resnet (+ transformer) pairs of a down or up block."""

    def _build(self, resnet_channels: list[tuple[int, int]], temb_channels: int, eps: float, attention: dict | None,
               policy: Policy, rngs: nnx.Rngs, groups: int):
        self.resnets = nnx.List([
            SpatioTemporalResBlock(c_in, c_out, temb_channels, eps, eps, policy, rngs)
            for c_in, c_out in resnet_channels])
        self.attentions = None if attention is None else nnx.List([
            TransformerSpatioTemporalModel(c_out, policy=policy, rngs=rngs, groups=groups, **attention)
            for _, c_out in resnet_channels])

    def _layer(self, index: int, x, num_frames: int, temb, context):
        x = self.resnets[index](x, num_frames, temb)
        if self.attentions is not None:
            x = self.attentions[index](x, num_frames, context)
        return x


def transformer_settings(heads: int, cross_attention_dim: int, num_layers: int, norm_eps: float,
                         layer_norm_eps: float) -> dict:
    """The arguments every :class:`TransformerSpatioTemporalModel` of one block shares."""
    return dict(heads=heads, cross_attention_dim=cross_attention_dim, num_layers=num_layers, norm_eps=norm_eps,
                layer_norm_eps=layer_norm_eps)


class DownBlockSpatioTemporal(_ResnetAttentionPairs):
    """diffusers ``DownBlockSpatioTemporal`` (``attention=None``) or ``CrossAttnDownBlockSpatioTemporal``
    (``attention=transformer_settings(...)``): resnets (each followed by a transformer), then a stride-2 conv.
    Returns the output and the skip activations (each layer's output, then the downsampled one)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int, eps: float,
                 add_downsample: bool, policy: Policy, rngs: nnx.Rngs, *, attention: dict | None = None,
                 groups: int = 32):
        channels = [(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        self._build(channels, temb_channels, eps, attention, policy, rngs, groups)
        self.downsamplers = nnx.List([Downsample2D(out_channels, policy, rngs)]) if add_downsample else None

    def __call__(self, x, num_frames: int, temb, context=None):
        skips = []
        for i in range(len(self.resnets)):
            x = self._layer(i, x, num_frames, temb, context)
            skips.append(x)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                x = downsampler(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlockSpatioTemporal(_ResnetAttentionPairs):
    """diffusers ``UpBlockSpatioTemporal`` (``attention=None``) or ``CrossAttnUpBlockSpatioTemporal``: each
    resnet takes ``concat([x, skip])`` (x first, skips popped last-first), then nearest x2 and a conv."""

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, temb_channels: int,
                 num_layers: int, eps: float, add_upsample: bool, policy: Policy, rngs: nnx.Rngs, *,
                 attention: dict | None = None, groups: int = 32):
        channels = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            channels.append(((prev_output_channels if i == 0 else out_channels) + skip_channels, out_channels))
        self._build(channels, temb_channels, eps, attention, policy, rngs, groups)
        self.upsamplers = nnx.List([Upsample2D(out_channels, policy, rngs)]) if add_upsample else None

    def __call__(self, x, skips: tuple, num_frames: int, temb, context=None):
        if len(skips) != len(self.resnets):
            raise ValueError(f"UpBlockSpatioTemporal: needs {len(self.resnets)} skip activations, got {len(skips)}")
        for i in range(len(self.resnets)):
            x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
            x = self._layer(i, x, num_frames, temb, context)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                x = upsampler(x)
        return x


class UNetMidBlockSpatioTemporal(nnx.Module):
    """``resnets.0``, then (``attentions.i``, ``resnets.i+1``) pairs; channels unchanged."""

    def __init__(self, channels: int, temb_channels: int, eps: float, attention: dict, policy: Policy,
                 rngs: nnx.Rngs, num_layers: int = 1, groups: int = 32):
        self.attentions = nnx.List([
            TransformerSpatioTemporalModel(channels, policy=policy, rngs=rngs, groups=groups, **attention)
            for _ in range(num_layers)])
        self.resnets = nnx.List([
            SpatioTemporalResBlock(channels, channels, temb_channels, eps, eps, policy, rngs)
            for _ in range(num_layers + 1)])

    def __call__(self, x, num_frames: int, temb, context):
        x = self.resnets[0](x, num_frames, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, num_frames, context), num_frames, temb)
        return x
