"""The SVD VAE: the KL-f8 encoder with the temporal decoder (``AutoencoderKLTemporalDecoder``) or with the
per-frame image decoder of the ``*_image_decoder`` checkpoints (``AutoencoderKL``). Attribute paths mirror
diffusers' names.

Calls (channels-last): ``vae.encode(x [N, H, W, 3]) -> (mean, logvar)``, each ``[N, H/8, W/8, 4]``, logvar
clamped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution`` does (SVD conditions on the mean, the
posterior's mode); ``vae.decode(z [N, h, w, 4], num_frames) -> [N, 8h, 8w, 3]``. The temporal decoder treats
``z`` as ``N // num_frames`` videos of ``num_frames`` consecutive frames: its temporal GroupNorms and
convolutions see exactly those frames. The image decoder decodes each frame alone and ignores ``num_frames``.

:func:`decode_latents` is the pipeline's chunked decode; :func:`encode_images` and :func:`decode_frames` are
jitted ``encode`` and ``decode``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from svd_jax.configs import VAEConfig
from svd_jax.layers import GroupNorm, conv, temporal_conv
from svd_jax.policy import Policy
from svd_jax.vae_blocks import (
    DownEncoderBlock2D,
    MidBlockTemporalDecoder,
    UNetMidBlock2D,
    UpBlockTemporalDecoder,
    UpDecoderBlock2D,
)

LOGVAR_RANGE = (-30.0, 20.0)


class Encoder(nnx.Module):
    """diffusers ``Encoder(double_z=True)``: ``conv_in``, ``down_blocks``, ``mid_block``, ``conv_norm_out``, SiLU,
    ``conv_out`` to ``2 * latent_channels`` (mean | logvar)."""

    def __init__(self, config: VAEConfig, policy: Policy, rngs: nnx.Rngs):
        channels, groups, eps = config.block_out_channels, config.norm_num_groups, config.norm_eps
        self.conv_in = conv(config.in_channels, channels[0], 3, policy, rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(channels[max(i - 1, 0)], ch, config.layers_per_block, i < len(channels) - 1, groups,
                               eps, policy, rngs)
            for i, ch in enumerate(channels)
        ])
        self.mid_block = UNetMidBlock2D(channels[-1], groups, eps, policy, rngs)
        self.conv_norm_out = GroupNorm(channels[-1], groups, eps, policy, rngs)
        self.conv_out = conv(channels[-1], 2 * config.latent_channels, 3, policy, rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class TemporalDecoder(nnx.Module):
    """diffusers ``TemporalDecoder``: ``conv_in``, ``mid_block``, ``up_blocks`` (spatio-temporal resblocks),
    ``conv_norm_out``, SiLU, ``conv_out``, then ``time_conv_out`` across the frames of each video."""

    def __init__(self, config: VAEConfig, policy: Policy, rngs: nnx.Rngs):
        channels, eps, t_eps = config.block_out_channels, config.norm_eps, config.temporal_norm_eps
        reversed_channels = tuple(reversed(channels))
        self.conv_in = conv(config.latent_channels, channels[-1], 3, policy, rngs)
        self.mid_block = MidBlockTemporalDecoder(channels[-1], config.layers_per_block, eps, t_eps, policy, rngs)
        self.up_blocks = nnx.List([
            UpBlockTemporalDecoder(reversed_channels[max(i - 1, 0)], ch, config.layers_per_block + 1,
                                   i < len(channels) - 1, eps, t_eps, policy, rngs)
            for i, ch in enumerate(reversed_channels)
        ])
        self.conv_norm_out = GroupNorm(channels[0], 32, eps, policy, rngs)
        self.conv_out = conv(channels[0], config.out_channels, 3, policy, rngs)
        self.time_conv_out = temporal_conv(config.out_channels, config.out_channels, policy, rngs)

    def __call__(self, z, num_frames: int):
        x = self.mid_block(self.conv_in(z), num_frames)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        n, h, w, c = x.shape
        return self.time_conv_out(x.reshape(n // num_frames, num_frames, h, w, c)).reshape(n, h, w, c)


class Decoder(nnx.Module):
    """diffusers ``Decoder`` (the per-frame KL-f8 decoder): ``conv_in``, ``mid_block``, ``up_blocks``,
    ``conv_norm_out``, SiLU, ``conv_out``."""

    def __init__(self, config: VAEConfig, policy: Policy, rngs: nnx.Rngs):
        channels, groups, eps = config.block_out_channels, config.norm_num_groups, config.norm_eps
        reversed_channels = tuple(reversed(channels))
        self.conv_in = conv(config.latent_channels, channels[-1], 3, policy, rngs)
        self.mid_block = UNetMidBlock2D(channels[-1], groups, eps, policy, rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(reversed_channels[max(i - 1, 0)], ch, config.layers_per_block + 1, i < len(channels) - 1,
                             groups, eps, policy, rngs)
            for i, ch in enumerate(reversed_channels)
        ])
        self.conv_norm_out = GroupNorm(channels[0], groups, eps, policy, rngs)
        self.conv_out = conv(channels[0], config.out_channels, 3, policy, rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class _KLAutoencoder(nnx.Module):
    """The shared encoder side (``encoder`` + ``quant_conv``) and input checks."""

    def __init__(self, config: VAEConfig, policy: Policy | None, rngs: nnx.Rngs):
        policy = policy or Policy.float32()
        self.config = config
        self.dtype = policy.compute
        self.encoder = Encoder(config, policy, rngs)
        self.quant_conv = conv(2 * config.latent_channels, 2 * config.latent_channels, 1, policy, rngs)

    def encode(self, x):
        """``x [N, H, W, in_channels]`` in [-1, 1] -> ``(mean, logvar)`` of the posterior, each ``[N, h, w, C]``."""
        c = self.config
        if getattr(x, "ndim", 0) != 4 or x.shape[-1] != c.in_channels:
            raise ValueError(f"vae.encode expects x [N, H, W, {c.in_channels}] (channels last), "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        moments = self.quant_conv(self.encoder(jnp.asarray(x, self.dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def _check_latents(self, z, num_frames):
        c = self.config
        if getattr(z, "ndim", 0) != 4 or z.shape[-1] != c.latent_channels:
            raise ValueError(f"vae.decode expects z [N, h, w, {c.latent_channels}] (channels last), "
                             f"got {tuple(getattr(z, 'shape', ()))}")
        if not isinstance(num_frames, numbers.Integral) or isinstance(num_frames, bool) or num_frames < 1:
            raise ValueError(f"vae.decode: num_frames must be a positive int, got {num_frames!r}")
        return jnp.asarray(z, self.dtype)


class AutoencoderKLTemporalDecoder(_KLAutoencoder):
    """diffusers ``AutoencoderKLTemporalDecoder``: ``encoder``, ``quant_conv``, ``decoder`` (temporal)."""

    def __init__(self, config: VAEConfig, *, policy: Policy | None = None, rngs: nnx.Rngs):
        if config.decoder != "temporal":
            raise ValueError(f"AutoencoderKLTemporalDecoder needs a VAEConfig with decoder='temporal', "
                             f"got {config.decoder!r}")
        super().__init__(config, policy, rngs)
        self.decoder = TemporalDecoder(config, policy or Policy.float32(), rngs)

    def decode(self, z, num_frames: int):
        """``z [N, h, w, C]``, N a multiple of ``num_frames`` (consecutive frames form a video) -> ``[N, H, W, 3]``."""
        z = self._check_latents(z, num_frames)
        if z.shape[0] % num_frames:
            raise ValueError(f"vae.decode: {z.shape[0]} latents are not a whole number of videos of "
                             f"num_frames={num_frames}")
        return self.decoder(z, num_frames)


class AutoencoderKL(_KLAutoencoder):
    """diffusers ``AutoencoderKL`` (the image-decoder checkpoints): ``encoder``, ``quant_conv``,
    ``post_quant_conv``, ``decoder`` (per frame)."""

    def __init__(self, config: VAEConfig, *, policy: Policy | None = None, rngs: nnx.Rngs):
        if config.decoder != "image":
            raise ValueError(f"AutoencoderKL needs a VAEConfig with decoder='image', got {config.decoder!r}")
        super().__init__(config, policy, rngs)
        policy = policy or Policy.float32()
        self.post_quant_conv = conv(config.latent_channels, config.latent_channels, 1, policy, rngs)
        self.decoder = Decoder(config, policy, rngs)

    def decode(self, z, num_frames: int = 1):
        """``z [N, h, w, C]`` -> ``[N, H, W, 3]``, each frame decoded alone (``num_frames`` is accepted and unused)."""
        return self.decoder(self.post_quant_conv(self._check_latents(z, num_frames)))


# ----------------------------------------------------------------------------------------------------------------
# Jitted entry points: pure functions of (graphdef, state, inputs). jax.jit caches one compilation per graphdef
# (static) and input shape, so repeated calls with the same chunk shape never retrace.


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, images):
    return nnx.merge(graphdef, state).encode(images)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(graphdef, state, z, num_frames):
    return nnx.merge(graphdef, state).decode(z, num_frames)


def encode_images(vae, images):
    """Jitted ``vae.encode``: ``images [N, H, W, 3]`` in [-1, 1] -> ``(mean, logvar)``."""
    graphdef, state = nnx.split(vae)
    return _encode(graphdef, state, images)


def decode_frames(vae, z, num_frames: int):
    """Jitted ``vae.decode(z, num_frames)``: ``z [N, h, w, C]`` (unscaled latents) -> ``[N, H, W, 3]``."""
    graphdef, state = nnx.split(vae)
    return _decode(graphdef, state, z, num_frames)


def decode_latents(vae, latents, decode_chunk_size: int | None = None):
    """diffusers ``StableVideoDiffusionPipeline.decode_latents``, channels-last.

    ``latents [B, F, h, w, C]`` (in the sampler's scaled space) -> frames ``[B, F, H, W, 3]`` float32, roughly in
    [-1, 1] (not post-processed). The latents are divided by ``config.scaling_factor``, flattened to ``B*F``
    frames and decoded ``decode_chunk_size`` frames at a time (default: ``F``, one video per call); each chunk is
    a separate decode with ``num_frames = len(chunk)``, exactly as diffusers does, so with the temporal decoder
    the chunk size changes the output, the last chunk may be shorter, and a chunk may span two videos when
    ``decode_chunk_size`` does not divide ``F``. Each chunk shape compiles once.
    """
    if getattr(latents, "ndim", 0) != 5:
        raise ValueError(f"decode_latents expects latents [B, F, h, w, C], got {tuple(getattr(latents, 'shape', ()))}")
    b, f = latents.shape[:2]
    chunk = f if decode_chunk_size is None else decode_chunk_size
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"decode_chunk_size must be a positive int, got {decode_chunk_size!r}")
    flat = _unscaled_frames(latents, 1.0 / vae.config.scaling_factor)
    graphdef, state = nnx.split(vae)
    chunk = int(chunk)
    frames = [_decode(graphdef, state, flat[i:i + chunk] if chunk < b * f else flat, min(chunk, b * f - i))
              for i in range(0, b * f, chunk)]
    return _videos(frames, b)


# The reshapes and scaling around the decoder, one program each (eagerly, several per new shape and process).
@functools.partial(jax.jit, static_argnums=1)
def _unscaled_frames(latents, factor: float):
    return jnp.reshape(latents, (-1, *latents.shape[2:])) * factor


@functools.partial(jax.jit, static_argnums=1)
def _videos(chunks: list, num_videos: int):
    frames = jnp.concatenate(chunks, axis=0)
    return frames.reshape(num_videos, -1, *frames.shape[1:]).astype(jnp.float32)
