"""The guided UNet as a denoiser: the one compiled UNet evaluation every sampler calls.

:func:`unet_input` assembles the UNet's sample for sampling and for training alike. :func:`guided_output` is the
UNet on ``[uncond, cond]`` rows (or cond only) with per-frame classifier-free guidance, traced inside the jitted
programs here. A :class:`Denoiser` binds those programs to one set of weights and one :class:`Conditioning`:
``denoiser(x, sigma)`` is k-diffusion's denoiser D(x, sigma) (the float32 x0 estimate), which any sampler over a
denoiser can drive; ``denoiser.euler_step`` is the EDM Euler step fused with the UNet in one program, the default
sampler.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from svd_jax import scheduler, sharding


class Conditioning(NamedTuple):
    """What the UNet is conditioned on, batched as [uncond, cond] when guidance is on."""

    image_embeds: jax.Array  # [B', 1, D]
    image_latents: jax.Array  # [B', h, w, 4], the unscaled posterior mode of the noise-augmented image
    added_time_ids: jax.Array  # [B', 3]: fps - 1, motion_bucket_id, noise_aug_strength
    guidance_scales: jax.Array | None  # [F] per-frame scales, None when guidance is off

    @property
    def guided(self) -> bool:
        return self.guidance_scales is not None

    @property
    def num_videos(self) -> int:
        return self.image_latents.shape[0] // (2 if self.guided else 1)


def unet_input(latents, sigma, image_latents, dtype) -> jax.Array:
    """The UNet's sample ``[B, F, h, w, 2C]`` in ``dtype``: the noisy ``latents [B, F, h, w, C]`` scaled by
    c_in(sigma) (``sigma`` a scalar or broadcastable to the latents), then the conditioning image's latent
    ``image_latents [B, h, w, C]`` repeated on every frame, on the channel axis. Both parts are float32 until the
    final cast."""
    scaled = scheduler.scale_model_input(latents, sigma)
    image = jnp.broadcast_to(image_latents[:, None].astype(jnp.float32), scaled.shape[:-1] + image_latents.shape[-1:])
    return jnp.concatenate([scaled, image], axis=-1).astype(dtype)


def guided_output(unet, latents, sigma, c_noise, cond: Conditioning, mesh: Mesh | None = None) -> jax.Array:
    """The UNet's v-prediction for ``latents [B, F, h, w, C]`` at ``sigma`` (scalar, or ``[B]`` with ``c_noise``
    ``[B]``), with guidance applied when ``cond`` is guided; float32. Traced inside a jitted program."""
    guided = cond.guided
    model_in = jnp.concatenate([latents, latents]) if guided else latents
    sigma = jnp.asarray(sigma, jnp.float32)
    c_noise = jnp.asarray(c_noise, jnp.float32)
    if sigma.ndim:  # one noise level per video: the same for both guidance halves
        if guided:
            sigma, c_noise = jnp.concatenate([sigma, sigma]), jnp.concatenate([c_noise, c_noise])
        sigma = sigma.reshape((-1,) + (1,) * (latents.ndim - 1))
    sample = unet_input(model_in, sigma, cond.image_latents, unet.dtype)
    if mesh is not None:  # the videos and both guidance halves are rows of one batch: split them
        sample = jax.lax.with_sharding_constraint(sample, sharding.rows(mesh, sample.shape[0], sample.ndim))
    timestep = jnp.broadcast_to(c_noise, (sample.shape[0],))
    out = unet(sample, timestep, cond.image_embeds, jnp.asarray(cond.added_time_ids, jnp.float32))
    out = out.astype(jnp.float32)
    if guided:
        uncond, cond_out = jnp.split(out, 2)
        out = scheduler.apply_guidance(uncond, cond_out, cond.guidance_scales)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _euler_step(graph, mesh, state, latents, sigma, sigma_next, c_noise, cond: Conditioning):
    """One Euler step: the guided UNet, then the update; float32 state. ``latents`` is donated."""
    out = guided_output(nnx.merge(graph, state), latents, sigma, c_noise, cond, mesh)
    return scheduler.euler_step(latents, out, sigma, sigma_next)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _denoise(graph, mesh, state, x, sigma, cond: Conditioning):
    sigma = jnp.asarray(sigma, jnp.float32)
    out = guided_output(nnx.merge(graph, state), x, sigma, scheduler.c_noise(sigma), cond, mesh)
    return scheduler.denoised(x, out, sigma.reshape((-1,) + (1,) * (x.ndim - 1)) if sigma.ndim else sigma)


class Denoiser:
    """The guided UNet bound to one set of weights (split graph and state) and one conditioning.

    ``denoiser(x, sigma)``: D(x, sigma), the float32 x0 estimate for ``x [B, F, h, w, C]`` at ``sigma`` (a scalar
    or one per video, ``[B]``), as k-diffusion's samplers expect; ``x`` is kept. ``euler_step(x, sigma,
    sigma_next, c_noise)``: one EDM Euler step fused with the UNet; ``x`` is donated (use the returned array).
    Both compile once per graph and shape, whichever weights are bound.
    """

    def __init__(self, graph, state, conditioning: Conditioning, mesh: Mesh | None = None):
        self.graph, self.state, self.conditioning, self.mesh = graph, state, conditioning, mesh

    # Traced under the mesh (sharding.mesh_context), so kernels that must run per device (the TPU attention) see it.
    def __call__(self, x, sigma) -> jax.Array:
        with sharding.mesh_context(self.mesh):
            return _denoise(self.graph, self.mesh, self.state, x, sigma, self.conditioning)

    def euler_step(self, x, sigma, sigma_next, c_noise) -> jax.Array:
        with sharding.mesh_context(self.mesh):
            return _euler_step(self.graph, self.mesh, self.state, x, sigma, sigma_next, c_noise, self.conditioning)
