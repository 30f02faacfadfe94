"""Videos longer than the UNet's trained frame count, training-free: overlapping temporal windows fused per step,
and autoregressive extension of a finished video.

Windowed sampling: the ``N`` frames are covered by windows of the trained length ``T`` starting every ``stride``
frames (the last window ends on the last frame). At every step each window is denoised as one video conditioned
on the input image (all windows are rows of one batch, so one compiled UNet program serves them and a mesh splits
them), and each frame's x0 estimate is the weighted mean of its windows' estimates. The weights ramp up and down
across each window's overlap (a cosine ramp, never zero inside a window) and are normalised to sum to one per
frame, so a frame covered by one window takes that window's estimate unchanged: with ``N == T`` the windowed
denoiser is the plain one. Any sampler over a denoiser runs on top of it. The initial noise of the frames past
the first window re-uses the first window's noise frames in shuffled order (FreeNoise's noise rescheduling), so
overlapping windows start from correlated noise and agree with each other.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svd_jax.denoiser import Conditioning, Denoiser


def window_starts(num_frames: int, window: int, stride: int) -> tuple[int, ...]:
    """First frame of each window: every ``stride`` frames, the last window ending on the last frame."""
    if window < 1 or stride < 1 or num_frames < 1:
        raise ValueError(f"num_frames, window and stride must be positive, got {num_frames}, {window}, {stride}")
    if stride > window:
        raise ValueError(f"the window stride ({stride}) must not exceed the window length ({window}): frames "
                         "between windows would never be denoised")
    if num_frames <= window:
        return (0,)
    starts = list(range(0, num_frames - window, stride))
    return tuple(starts + [num_frames - window])


def default_stride(window: int) -> int:
    """Half-window overlap (at least one frame of overlap, at least one new frame per window)."""
    return max(1, window - max(1, window // 2))


def fusion_weights(num_frames: int, window: int, starts: Sequence[int]) -> np.ndarray:
    """float32 ``[num_windows, window]``: each window's weight for each of its frames, summing to one per frame.

    A window's raw weight rises over the frames it shares with the previous window and falls over those it
    shares with the next (a raised cosine over the overlap, strictly positive), and is 1 elsewhere."""
    if num_frames <= window:
        return np.ones((1, num_frames), np.float32)
    raw = np.ones((len(starts), window), np.float64)
    for w, start in enumerate(starts):
        if w > 0:
            overlap = starts[w - 1] + window - start
            raw[w, :overlap] = _ramp(overlap)
        if w + 1 < len(starts):
            overlap = start + window - starts[w + 1]
            raw[w, window - overlap:] = np.minimum(raw[w, window - overlap:], _ramp(overlap)[::-1])
    total = np.zeros(num_frames)
    for w, start in enumerate(starts):
        total[start:start + window] += raw[w]
    weights = np.stack([raw[w] / total[start:start + window] for w, start in enumerate(starts)])
    return weights.astype(np.float32)


def _ramp(length: int) -> np.ndarray:
    """Raised cosine from near 0 to near 1 over ``length`` frames, strictly inside (0, 1)."""
    t = (np.arange(length) + 1.0) / (length + 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * t)


def window_conditioning(conditioning: Conditioning, num_windows: int) -> Conditioning:
    """Each video's conditioning rows repeated once per window, in the row order of :func:`_windows`."""
    def repeat(a):
        return jnp.repeat(a, num_windows, axis=0)

    return conditioning._replace(image_embeds=repeat(conditioning.image_embeds),
                                 image_latents=repeat(conditioning.image_latents),
                                 added_time_ids=repeat(conditioning.added_time_ids))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _windows(x, starts: tuple[int, ...], window: int):
    """``x [B, N, ...]`` -> ``[B * W, T, ...]``, video-major (all windows of video 0, then video 1, ...)."""
    index = np.asarray(starts)[:, None] + np.arange(window)[None]
    return x[:, index].reshape((-1, window) + x.shape[2:])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fuse(denoised, starts: tuple[int, ...], num_frames: int, weights):
    """Windows' estimates ``[B * W, T, ...]`` -> per-frame weighted sums ``[B, N, ...]``."""
    num_windows, window = weights.shape
    per_video = denoised.reshape((-1, num_windows, window) + denoised.shape[2:])
    index = np.asarray(starts)[:, None] + np.arange(window)[None]
    weighted = per_video * weights.reshape((1, num_windows, window) + (1,) * (denoised.ndim - 2))
    out = jnp.zeros((per_video.shape[0], num_frames) + denoised.shape[2:], jnp.float32)
    return out.at[:, index].add(weighted)


class WindowedDenoiser:
    """A denoiser over ``[B, N, h, w, C]`` built from one over ``[B * W, T, h, w, C]`` (the guided UNet with the
    conditioning of :func:`window_conditioning`): every window denoised in one call, the estimates fused with
    :func:`fusion_weights`. ``evaluations`` counts the calls (UNet evaluations of the whole window batch)."""

    def __init__(self, denoiser: Denoiser, num_frames: int, window: int, stride: int):
        self.denoiser, self.num_frames, self.window = denoiser, num_frames, window
        self.starts = window_starts(num_frames, window, stride)
        self.weights = jnp.asarray(fusion_weights(num_frames, window, self.starts))
        self.evaluations = 0

    def __call__(self, x, sigma) -> jax.Array:
        self.evaluations += 1
        denoised = self.denoiser(_windows(x, self.starts, self.window), sigma)
        return _fuse(denoised, self.starts, self.num_frames, self.weights)


def freenoise(noise: jax.Array, num_frames: int, key: jax.Array) -> jax.Array:
    """Extend one video's initial noise ``[T, ...]`` to ``[num_frames, ...]``: frames past ``T`` re-use the first
    ``T`` noise frames, each further block of ``T`` frames in its own random order drawn from ``key``."""
    window = noise.shape[0]
    if num_frames <= window:
        return noise[:num_frames]
    blocks = [noise]
    for b in range(math.ceil((num_frames - window) / window)):
        blocks.append(noise[jax.random.permutation(jax.random.fold_in(key, b), window)])
    return jnp.concatenate(blocks)[:num_frames]
