"""Shared Flax NNX building blocks, channels-last.

Attribute names mirror the PyTorch (diffusers) modules, so that ``path.to.module.weight`` in a checkpoint is
``path.to.module.kernel`` here and conversion needs only per-module-type rules (``convert/rules.py``).
Images are ``[N, H, W, C]``; videos ``[B, F, H, W, C]``. Spatial layers see ``[B*F, H, W, C]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svd_jax.attention import attention
from svd_jax.policy import CHECKPOINT_POLICIES, Policy


def dense(in_features: int, out_features: int, policy: Policy, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=policy.compute,
                      param_dtype=policy.param, precision=policy.lax_precision, rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size, policy: Policy, rngs: nnx.Rngs, *, strides=1,
         padding="SAME", use_bias: bool = True) -> nnx.Conv:
    """A convolution whose kernel is stored like PyTorch's weight, transposed to ``[*K, I, O]``."""
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    return nnx.Conv(in_features, out_features, kernel_size=tuple(kernel_size), strides=strides, padding=padding,
                    use_bias=use_bias, dtype=policy.compute, param_dtype=policy.param,
                    precision=policy.lax_precision, rngs=rngs)


class TemporalConv(nnx.Conv):
    """PyTorch ``Conv3d`` with kernel (3, 1, 1) and padding (1, 0, 0) on ``[B, F, H, W, C]``: a convolution over
    frames with one zero frame of padding at each end. The kernel is stored ``[3, 1, 1, I, O]`` like any 3D
    convolution's; it runs as a 2D convolution of ``[B, F, H*W, C]`` with kernel (3, 1), the same sums, because GPU
    convolution libraries are tuned for 2D far more than for 3D."""

    def __call__(self, x):
        b, f, h, w, c = x.shape
        if c != self.in_features:
            raise ValueError(f"TemporalConv expects {self.in_features} channels (x [B, F, H, W, C]), got shape "
                             f"{tuple(x.shape)}")
        kernel = self.kernel[...].reshape(3, 1, c, -1).astype(self.dtype)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype).reshape(b, f, h * w, c), kernel, (1, 1), ((1, 1), (0, 0)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, f, h, w, -1)


def temporal_conv(in_features: int, out_features: int, policy: Policy, rngs: nnx.Rngs) -> TemporalConv:
    return TemporalConv(in_features, out_features, kernel_size=(3, 1, 1), padding=((1, 1), (0, 0), (0, 0)),
                        dtype=policy.compute, param_dtype=policy.param, precision=policy.lax_precision, rngs=rngs)


class Identity(nnx.Module):
    """Placeholder for parameter-free PyTorch modules (dropout at p=0) that keep list indices aligned."""

    def __call__(self, x):
        return x


class GroupNorm(nnx.Module):
    """GroupNorm with float32 statistics over every axis but the first (batch) and the channel groups.

    Feed ``[B*F, H, W, C]`` for per-frame statistics and ``[B, F, H, W, C]`` for statistics across frames
    (the temporal blocks). ``eps`` is always explicit: the checkpoint's value, never a library default.
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float, policy: Policy, rngs: nnx.Rngs):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = policy.compute
        self.scale = nnx.Param(jnp.ones((num_channels,), policy.param))
        self.bias = nnx.Param(jnp.zeros((num_channels,), policy.param))

    def __call__(self, x):
        shape = x.shape
        x32 = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
        mean = jnp.mean(x32, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 3), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with float32 statistics and an explicit eps."""

    def __init__(self, dim: int, eps: float, policy: Policy, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = policy.compute
        self.scale = nnx.Param(jnp.ones((dim,), policy.param))
        self.bias = nnx.Param(jnp.zeros((dim,), policy.param))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def gelu_exact(x):
    """PyTorch's default ``nn.GELU`` (erf form); ``jax.nn.gelu`` defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def sinusoidal_embedding(timesteps, dim: int, max_period: float = 10000.0):
    """``[cos | sin]`` embedding of ``timesteps [N]`` -> ``[N, dim]`` float32, frequencies
    ``exp(-ln(max_period) * i / (dim // 2))`` (diffusers ``Timesteps(flip_sin_to_cos=True,
    downscale_freq_shift=0)``; sgm ``timestep_embedding``)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding``), ``out_dim`` defaulting to the hidden size."""

    def __init__(self, in_channels: int, time_embed_dim: int, policy: Policy, rngs: nnx.Rngs,
                 out_dim: int | None = None):
        self.linear_1 = dense(in_channels, time_embed_dim, policy, rngs)
        self.linear_2 = dense(time_embed_dim, out_dim or time_embed_dim, policy, rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
    """``proj`` to ``2 * dim_out``: the first half is the value, the second the gate; value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int, policy: Policy, rngs: nnx.Rngs):
        self.proj = dense(dim_in, 2 * dim_out, policy, rngs)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * gelu_exact(gate)


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(dim, activation_fn="geglu")``: ``net.0`` GEGLU, ``net.1`` dropout, ``net.2`` Linear."""

    def __init__(self, dim: int, policy: Policy, rngs: nnx.Rngs, dim_out: int | None = None, mult: int = 4):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, policy, rngs), Identity(), dense(inner, dim_out or dim, policy, rngs)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x


def project_together(x, layers) -> list:
    """``[layer(x) for layer in layers]`` for ``nnx.Linear`` layers of one dtype and precision, as one matmul over
    their kernels (and biases) concatenated along the output axis: the same sums per output column, one pass
    over ``x`` instead of one per layer (adapted layers' low-rank updates are added per layer). The concatenation
    happens here, under ``jit``, not in the checkpoint."""
    first = layers[0]
    kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=1).astype(first.dtype)
    y = jax.lax.dot_general(x.astype(first.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())),
                            precision=first.precision)
    if first.bias is not None:
        y = y + jnp.concatenate([layer.bias[...] for layer in layers]).astype(first.dtype)
    splits = np.cumsum([layer.out_features for layer in layers])[:-1]
    outputs = jnp.split(y, splits, axis=-1)
    # a layer with a LoRA adapter (svd_jax.lora) adds its low-rank update to the shared projection
    return [out + layer.low_rank_update(x) if hasattr(layer, "low_rank_update") else out
            for out, layer in zip(outputs, layers)]


def rows_per_context(rows: int, contexts: int, what: str) -> int:
    """How many consecutive rows of tokens share one context row (row ``i`` uses context ``i // r``)."""
    if contexts < 1 or rows % contexts:
        raise ValueError(f"{what}: {rows} rows of tokens cannot share {contexts} contexts evenly")
    return rows // contexts


class Attention(nnx.Module):
    """diffusers ``Attention`` for tokens ``[N, L, C]``: ``to_q/to_k/to_v`` and ``to_out.0``, scale 1/sqrt(head_dim).

    Self-attention projects q, k and v in one matmul. Cross-attention takes a ``context [Nc, Lk, D]`` with ``Nc``
    dividing ``N``: consecutive blocks of ``N / Nc`` token rows share a context row (frames of a video, positions
    of a video), so the context is projected once per row of it, not once per row of tokens. With one context
    token (SVD's image embedding), softmax over a single key is exactly 1 whatever the query, so the output is
    ``to_out(to_v(context))`` broadcast over the tokens: no query projection, no attention, and ``x`` is only read
    for its shape.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, policy: Policy, rngs: nnx.Rngs, *,
                 cross_attention_dim: int | None = None, bias: bool = False, out_bias: bool = True):
        inner = heads * dim_head
        self.heads = heads
        self.impl = policy.attention_impl
        self.precision = policy.lax_precision
        self.to_q = dense(query_dim, inner, policy, rngs, use_bias=bias)
        self.to_k = dense(cross_attention_dim or query_dim, inner, policy, rngs, use_bias=bias)
        self.to_v = dense(cross_attention_dim or query_dim, inner, policy, rngs, use_bias=bias)
        self.to_out = nnx.List([dense(inner, query_dim, policy, rngs, use_bias=out_bias), Identity()])

    def _output(self, out):
        for layer in self.to_out:
            out = layer(out)
        return out

    def __call__(self, x, context=None):
        n, lq, _ = x.shape
        if context is None:
            q, k, v = project_together(x, (self.to_q, self.to_k, self.to_v))
        else:
            repeat = rows_per_context(n, context.shape[0], "Attention")
            if context.shape[1] == 1:
                out = self._output(self.to_v(context))  # [Nc, 1, C]
                out = jnp.broadcast_to(out[:, None], (context.shape[0], repeat, lq, out.shape[-1]))
                return out.reshape(n, lq, -1)
            k, v = (jnp.repeat(t, repeat, axis=0) for t in project_together(context, (self.to_k, self.to_v)))
            q = self.to_q(x)
        q, k, v = (t.reshape(*t.shape[:2], self.heads, -1) for t in (q, k, v))
        out = attention(q, k, v, impl=self.impl, precision=self.precision)
        return self._output(out.reshape(n, lq, -1))


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` as SVD uses it: GN-SiLU-conv, + Linear(SiLU(temb)), GN-SiLU-conv, shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, eps: float, policy: Policy,
                 rngs: nnx.Rngs, groups: int = 32):
        self.norm1 = GroupNorm(in_channels, groups, eps, policy, rngs)
        self.conv1 = conv(in_channels, out_channels, 3, policy, rngs)
        self.time_emb_proj = dense(temb_channels, out_channels, policy, rngs) if temb_channels else None
        self.norm2 = GroupNorm(out_channels, groups, eps, policy, rngs)
        self.conv2 = conv(out_channels, out_channels, 3, policy, rngs)
        self.conv_shortcut = conv(in_channels, out_channels, 1, policy, rngs) if in_channels != out_channels else None

    def __call__(self, x, temb=None):
        """``x [N, H, W, C]``, ``temb [N, T]`` or None."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class TemporalResnetBlock(nnx.Module):
    """diffusers ``TemporalResnetBlock`` on ``[B, F, H, W, C]``: GroupNorm over all frames, convs across frames."""

    def __init__(self, channels: int, temb_channels: int | None, eps: float, policy: Policy, rngs: nnx.Rngs,
                 groups: int = 32):
        self.norm1 = GroupNorm(channels, groups, eps, policy, rngs)
        self.conv1 = temporal_conv(channels, channels, policy, rngs)
        self.time_emb_proj = dense(temb_channels, channels, policy, rngs) if temb_channels else None
        self.norm2 = GroupNorm(channels, groups, eps, policy, rngs)
        self.conv2 = temporal_conv(channels, channels, policy, rngs)

    def __call__(self, x, temb=None):
        """``x [B, F, H, W, C]``, ``temb [B, F, T]`` or None."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, :, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return x + h


def checkpointed_call(layer, forward, x, num_frames: int, extra):
    """``forward(layer, x, num_frames, extra)``, under ``nnx.remat`` with the named policy ``layer.remat`` (set
    from :attr:`Policy.remat` when the layer was built) unless that is ``"none"``. ``num_frames`` is a Python int
    and stays static; parameter paths are the same either way."""
    if layer.remat == "none":
        return forward(layer, x, num_frames, extra)
    return nnx.remat(forward, static_argnums=(2,), policy=CHECKPOINT_POLICIES[layer.remat])(layer, x, num_frames,
                                                                                             extra)


class AlphaBlender(nnx.Module):
    """Learned blend of a spatial and a temporal branch, ``mix_factor`` a scalar of shape [1].

    ``temporal_gets_alpha=False`` (UNet, ``learned_with_images``): out = a*spatial + (1-a)*temporal, a = sigmoid(m).
    ``temporal_gets_alpha=True`` (VAE decoder, diffusers ``switch_spatial_to_temporal_mix``): the sides swap.
    At inference ``image_only_indicator`` is all zeros, so a = sigmoid(m) for every frame.
    """

    def __init__(self, policy: Policy, rngs: nnx.Rngs, *, temporal_gets_alpha: bool = False, alpha: float = 0.5):
        self.temporal_gets_alpha = temporal_gets_alpha
        self.mix_factor = nnx.Param(jnp.full((1,), alpha, policy.param))

    def __call__(self, x_spatial, x_temporal):
        alpha = jax.nn.sigmoid(self.mix_factor[...].astype(jnp.float32)).astype(x_spatial.dtype)
        if self.temporal_gets_alpha:
            alpha = 1.0 - alpha
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class SpatioTemporalResBlock(nnx.Module):
    """diffusers ``SpatioTemporalResBlock``: a per-frame ``ResnetBlock2D``, then a ``TemporalResnetBlock`` on its
    output, blended by an ``AlphaBlender``."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, eps: float,
                 temporal_eps: float, policy: Policy, rngs: nnx.Rngs, *, temporal_gets_alpha: bool = False):
        self.remat = policy.remat
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels, eps, policy, rngs)
        self.temporal_res_block = TemporalResnetBlock(out_channels, temb_channels, temporal_eps, policy, rngs)
        self.time_mixer = AlphaBlender(policy, rngs, temporal_gets_alpha=temporal_gets_alpha)

    def __call__(self, x, num_frames: int, temb=None):
        """``x [B*F, H, W, C]``, ``temb [B*F, T]`` or None -> ``[B*F, H, W, C_out]``."""
        return checkpointed_call(self, SpatioTemporalResBlock._forward, x, num_frames, temb)

    def _forward(self, x, num_frames: int, temb):
        spatial = self.spatial_res_block(x, temb)
        bf, h, w, c = spatial.shape
        video = spatial.reshape(bf // num_frames, num_frames, h, w, c)
        temb_video = None if temb is None else temb.reshape(bf // num_frames, num_frames, -1)
        temporal = self.temporal_res_block(video, temb_video)
        return self.time_mixer(video, temporal).reshape(bf, h, w, c)


class Downsample2D(nnx.Module):
    """``conv``: 3x3 stride 2. ``padding`` ((1,1),(1,1)) for the UNet; the VAE encoder pads (0,1),(0,1)."""

    def __init__(self, channels: int, policy: Policy, rngs: nnx.Rngs, padding=((1, 1), (1, 1))):
        self.conv = conv(channels, channels, 3, policy, rngs, strides=2, padding=padding)

    def __call__(self, x):
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then ``conv`` 3x3 pad 1."""

    def __init__(self, channels: int, policy: Policy, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, policy, rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)
