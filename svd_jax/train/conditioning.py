"""From video frames to what the UNet is trained on: VAE posteriors, CLIP embeddings, and the per-clip noise
augmentation of the conditioning frame.

:func:`encode_clips` runs the frozen encoders on clips (on the fly); :func:`encode_frames` on single frames (to
fill a disk cache). Both give the deterministic part, :class:`ClipFeatures`. :func:`training_batch` then adds
the random part: a latent sample of each frame's posterior, and the conditioning latent of the first frame with
Gaussian pixel noise whose std (drawn per clip) is also the ``noise_aug_strength`` the UNet is conditioned on.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from svd_jax.preprocess import clip_preprocess
from svd_jax.train.config import ObjectiveConfig
from svd_jax.train.objective import TrainBatch, sample_log_normal


class ClipFeatures(NamedTuple):
    """The deterministic inputs of a training batch of B clips of F frames."""

    latent_mean: jax.Array  # [B, F, h, w, C] VAE posterior mean of every frame (unscaled)
    latent_logvar: jax.Array  # [B, F, h, w, C]
    image_embeds: jax.Array  # [B, D] CLIP embedding of the clean first frame
    cond_frames: jax.Array  # [B, H, W, 3] the clean first frame in [-1, 1]
    fps_id: jax.Array  # [B] the clip's frame rate minus one
    motion_bucket_id: jax.Array  # [B]


def _check_frames(frames, ndim: int, what: str):
    if getattr(frames, "ndim", 0) != ndim or frames.shape[-1] != 3:
        layout = "[B, F, H, W, 3]" if ndim == 5 else "[N, H, W, 3]"
        raise ValueError(f"{what} must be {layout} in [-1, 1], got shape {tuple(getattr(frames, 'shape', ()))}")


def _embed(image_encoder, images):
    pixels = clip_preprocess(images.astype(jnp.float32), image_encoder.config.image_size)
    return image_encoder(pixels).astype(jnp.float32)


def encode_frames(vae, image_encoder, frames):
    """``frames [N, H, W, 3]`` -> ``(mean, logvar)`` ``[N, h, w, C]`` and CLIP embeddings ``[N, D]``, float32."""
    _check_frames(frames, 4, "frames")
    mean, logvar = vae.encode(frames)
    return mean.astype(jnp.float32), logvar.astype(jnp.float32), _embed(image_encoder, frames)


def encode_clips(vae, image_encoder, frames, fps_id, motion_bucket_id) -> ClipFeatures:
    """``frames [B, F, H, W, 3]`` in [-1, 1]; the first frame of each clip is its conditioning image."""
    _check_frames(frames, 5, "frames")
    b, f = frames.shape[:2]
    mean, logvar = vae.encode(frames.reshape(b * f, *frames.shape[2:]))
    mean, logvar = (a.astype(jnp.float32).reshape(b, f, *a.shape[1:]) for a in (mean, logvar))
    first = frames[:, 0].astype(jnp.float32)
    return ClipFeatures(mean, logvar, _embed(image_encoder, first), first,
                        jnp.asarray(fps_id, jnp.float32), jnp.asarray(motion_bucket_id, jnp.float32))


def training_batch(vae, features: ClipFeatures, key, objective: ObjectiveConfig) -> TrainBatch:
    """Sample the video latents and the noise-augmented conditioning latent of each clip."""
    latent_key, aug_key, pixel_key = jax.random.split(key, 3)
    mean, logvar = features.latent_mean, features.latent_logvar
    latents = mean
    if objective.latent_sample:
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(latent_key, mean.shape, jnp.float32)
    latents = latents * vae.config.scaling_factor

    b = mean.shape[0]
    cond_aug = sample_log_normal(aug_key, (b,), objective.cond_aug_p_mean, objective.cond_aug_p_std)
    frames = features.cond_frames.astype(jnp.float32)
    noisy = frames + cond_aug[:, None, None, None] * jax.random.normal(pixel_key, frames.shape, jnp.float32)
    cond_latents, _ = vae.encode(noisy)
    time_ids = jnp.stack([features.fps_id, features.motion_bucket_id, cond_aug], axis=-1).astype(jnp.float32)
    return TrainBatch(latents, cond_latents.astype(jnp.float32), features.image_embeds[:, None, :], time_ids)
