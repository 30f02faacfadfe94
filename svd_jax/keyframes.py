"""Keyframe in-betweening and loops: bidirectional sampling between a start and an end image, training-free.

The sampler is ViBiDSampler's (Yang et al., 2024). At every noise level ``sigma -> sigma_next``:

1. a forward pass conditioned on the start image: the guided x0 estimate with its last latent frame replaced by
   the end image's latent (a projection onto "the last frame is the end keyframe"), then an Euler step to
   ``sigma_next`` whose direction is taken from the *unconditional* estimate (CFG++; ``cfg_pp=False`` takes it
   from the guided one, plain CFG);
2. fresh noise brings the sample back to ``sigma``: ``x + eps * sqrt(sigma^2 - sigma_next^2)``;
3. the frame order is flipped and the same pass runs conditioned on the end image, with its (now last) frame
   replaced by the start image's latent; the order is flipped back.

Both passes evaluate the same compiled UNet program (one batch of ``[uncond, cond]`` rows, guidance applied
here with one constant scale per frame, since a ramp over frames would not survive the flip), so a step costs two
guided UNet evaluations: twice the plain sampler. A loop is the same with the end keyframe equal to the start
image. The keyframes' latents are the VAE posterior's mode times the scaling factor (the original code draws a
sample from the posterior; the mode is deterministic).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svd_jax import scheduler
from svd_jax.denoiser import Conditioning, Denoiser

NoiseSampler = Callable[[int, int], jax.Array]  # (step, pass) -> standard normal noise like the latents
PassCallback = Callable[[int, str, jax.Array], None]  # (step, "forward" | "backward", pinned x0 estimate)


def paired(conditioning: Conditioning, scale: float, num_frames: int) -> tuple[Conditioning, jax.Array]:
    """The conditioning's ``[uncond, cond]`` rows without guidance (so the UNet runs once on both halves and the
    caller combines them), and the constant per-frame scale ``[F]`` to combine them with."""
    if not conditioning.guided:
        raise ValueError("bidirectional sampling needs the unconditional rows: encode the conditioning with "
                         "max_guidance_scale > 1")
    if not math.isfinite(scale):
        raise ValueError(f"keyframe guidance scale must be finite, got {scale}")
    return conditioning._replace(guidance_scales=None), jnp.full((num_frames,), scale, jnp.float32)


@functools.partial(jax.jit, static_argnames="cfg_pp")
def _pass_update(x, both, scales, latent, sigma, sigma_next, cfg_pp: bool):
    """One pass: guided x0 with the last frame pinned to ``latent [B, h, w, C]``, then the step to sigma_next."""
    uncond, cond = jnp.split(both, 2)
    guided = scheduler.apply_guidance(uncond, cond, scales)
    pinned = guided.at[:, -1].set(latent.astype(jnp.float32))
    direction = uncond if cfg_pp else guided
    return pinned + (x - direction) / sigma * sigma_next, pinned


@jax.jit
def _add_noise(x, noise, scale):
    return x + noise * scale


@jax.jit
def _flip(x):
    return jnp.flip(x, axis=1)


def bidirectional_sample(start: Denoiser, end: Denoiser, x: jax.Array, sigmas: Sequence[float],
                         start_latent: jax.Array, end_latent: jax.Array, scales: jax.Array,
                         noise_sampler: NoiseSampler, *, cfg_pp: bool = True, start_first: bool = True,
                         callback: Callable | None = None, on_pass: PassCallback | None = None) -> jax.Array:
    """Bidirectional sampling of ``x [B, F, h, w, C]`` (already scaled to ``sigmas[0]``) down the schedule.

    ``start``/``end``: the unguided denoisers over the ``[uncond, cond]`` rows conditioned on each keyframe (see
    :func:`paired`); ``start_latent``/``end_latent [B, h, w, C]``: the keyframes' scaled latents; ``scales [F]``:
    the guidance scale per frame; ``noise_sampler(step, 0)`` draws the re-noising noise of step ``step`` (added
    between the two passes, in the frame order of the pass that ran first). ``start_first=False`` runs the
    backward pass first: sampling from the end keyframe to the start one this way is the time reversal of
    sampling from the start to the end the default way, given the flipped noise. ``callback(step, sigma, x)``
    runs after each step (returning an array replaces ``x``); ``on_pass(step, direction, pinned)`` sees each
    pass's pinned x0 estimate in that pass's frame order (its last frame is the pinned keyframe).
    """
    sigmas = np.asarray(sigmas, np.float32)
    passes = [("forward", start, end_latent), ("backward", end, start_latent)]
    if not start_first:
        passes.reverse()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        for k, (direction, denoiser, latent) in enumerate(passes):
            if k == 1:  # back to sigma before the second pass
                renoise = np.float32(math.sqrt(max(float(sigma) ** 2 - float(sigma_next) ** 2, 0.0)))
                x = _add_noise(x, noise_sampler(i, 0), renoise)
            if direction == "backward":
                x = _flip(x)
            both = denoiser(jnp.concatenate([x, x]), sigma)
            x, pinned = _pass_update(x, both, scales, latent, sigma, sigma_next, cfg_pp)
            if on_pass is not None:
                on_pass(i, direction, pinned)
            if direction == "backward":
                x = _flip(x)
        if callback is not None:
            replaced = callback(i, float(sigma), x)
            if replaced is not None:
                x = jnp.asarray(replaced, jnp.float32)
    return x


def seeded_noise_sampler(keys: Sequence[jax.Array], shape) -> NoiseSampler:
    """Re-noising noise per video from its own key (a video in a batch gets the noise it gets alone), a fresh
    draw per step and pass."""
    def sample(step: int, pass_index: int) -> jax.Array:
        return jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, step), pass_index), shape,
                                            jnp.float32) for k in keys])

    return sample
