"""The EDM training objective of SVD: sgm's ``StandardDiffusionLoss`` with ``EDMSampling`` noise levels, the
v-prediction denoiser (``Denoiser(VScalingWithEDMcNoise)``) and ``VWeighting``.

For clean latents x0 and a noise level sigma per clip (all frames of a clip share it, as the UNet takes one
timestep per video):

    x = x0 + sigma * n,   D = c_skip * x + c_out * F(c_in * x (+) z_cond, c_noise, embeds, time ids)
    loss = mean over clips of mean over (frames, h, w, channels) of w(sigma) * (D - x0)^2,  w = (sigma^2 + 1) / sigma^2

with the scalings of :mod:`svd_jax.scheduler` (c_in = 1/sqrt(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1),
c_skip = 1/(sigma^2+1), c_noise = ln(sigma)/4). Image-conditioning dropout zeroes a clip's CLIP embedding and
conditioning latent together (the unconditional branch of classifier-free guidance). Every random quantity is
an input (:class:`DiffusionNoise`), drawn by :func:`draw_diffusion_noise` in training and injected in tests.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from svd_jax import scheduler
from svd_jax.denoiser import unet_input
from svd_jax.train.config import ObjectiveConfig


class TrainBatch(NamedTuple):
    """What the UNet is trained on, per clip."""

    latents: jax.Array  # [B, F, h, w, C] clean latents x0, scaled by the VAE's scaling_factor
    cond_latents: jax.Array  # [B, h, w, C] unscaled posterior mean of the noise-augmented first frame
    image_embeds: jax.Array  # [B, 1, D] CLIP embedding of the clean first frame
    added_time_ids: jax.Array  # [B, 3]: fps - 1, motion_bucket_id, conditioning noise strength


class DiffusionNoise(NamedTuple):
    """The random part of one loss evaluation."""

    sigma: jax.Array  # [B] noise level per clip
    noise: jax.Array  # [B, F, h, w, C] unit Gaussian noise
    keep_image: jax.Array  # [B] 1.0 keeps the image conditioning, 0.0 drops it


def sample_log_normal(key, shape, mean: float, std: float) -> jax.Array:
    """exp(mean + std * N(0, 1)), float32 (sgm ``EDMSampling``)."""
    return jnp.exp(mean + std * jax.random.normal(key, shape, jnp.float32))


def v_weighting(sigma) -> jax.Array:
    """sgm ``VWeighting`` (``EDMWeighting`` with sigma_data = 1): (sigma^2 + 1) / sigma^2."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sigma * sigma + 1.0) / (sigma * sigma)


def draw_diffusion_noise(key, latents_shape, objective: ObjectiveConfig) -> DiffusionNoise:
    """Noise level, latent noise and image-dropout decision for a batch of clips ``latents_shape [B, F, h, w, C]``."""
    sigma_key, noise_key, drop_key = jax.random.split(key, 3)
    batch = latents_shape[0]
    sigma = sample_log_normal(sigma_key, (batch,), objective.p_mean, objective.p_std)
    noise = jax.random.normal(noise_key, latents_shape, jnp.float32)
    keep = (jax.random.uniform(drop_key, (batch,)) >= objective.cond_dropout).astype(jnp.float32)
    return DiffusionNoise(sigma, noise, keep)


def _per_clip(value, ndim: int):
    """``[B]`` -> ``[B, 1, ..., 1]`` with ``ndim`` axes."""
    return value.reshape((-1,) + (1,) * (ndim - 1))


def drop_image_conditioning(batch: TrainBatch, keep_image) -> TrainBatch:
    """Zero the CLIP embedding and the conditioning latent of the clips where ``keep_image`` is 0."""
    keep = jnp.asarray(keep_image, jnp.float32)
    return batch._replace(
        cond_latents=batch.cond_latents * _per_clip(keep, batch.cond_latents.ndim).astype(batch.cond_latents.dtype),
        image_embeds=batch.image_embeds * _per_clip(keep, batch.image_embeds.ndim).astype(batch.image_embeds.dtype))


def denoise(unet, noisy, sigma, cond_latents, image_embeds, added_time_ids) -> jax.Array:
    """The v-prediction EDM denoiser D(x, sigma) in float32: ``noisy [B, F, h, w, C]``, ``sigma [B]``."""
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_bc = _per_clip(sigma, noisy.ndim)
    out = unet(unet_input(noisy, sigma_bc, cond_latents, unet.dtype), scheduler.c_noise(sigma), image_embeds.astype(unet.dtype),
               jnp.asarray(added_time_ids, jnp.float32))
    return scheduler.denoised(noisy, out, sigma_bc)


def diffusion_loss(unet, batch: TrainBatch, noise: DiffusionNoise) -> tuple[jax.Array, jax.Array]:
    """``(mean loss, loss per clip [B])`` for one batch and one draw of the noise."""
    if batch.latents.ndim != 5:
        raise ValueError(f"latents must be [B, F, h, w, C], got shape {tuple(batch.latents.shape)}")
    if noise.noise.shape != batch.latents.shape or noise.sigma.shape != batch.latents.shape[:1]:
        raise ValueError(f"noise {tuple(noise.noise.shape)} / sigma {tuple(noise.sigma.shape)} do not match "
                         f"latents {tuple(batch.latents.shape)}")
    batch = drop_image_conditioning(batch, noise.keep_image)
    x0 = batch.latents.astype(jnp.float32)
    sigma = noise.sigma.astype(jnp.float32)
    noisy = x0 + noise.noise.astype(jnp.float32) * _per_clip(sigma, x0.ndim)
    d = denoise(unet, noisy, sigma, batch.cond_latents, batch.image_embeds, batch.added_time_ids)
    weighted = _per_clip(v_weighting(sigma), x0.ndim) * jnp.square(d - x0)
    per_clip = jnp.mean(weighted.reshape(weighted.shape[0], -1), axis=1)
    return jnp.mean(per_clip), per_clip
