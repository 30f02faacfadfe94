"""The :class:`~svd_jax.pipeline.Pipeline`'s samplers, from noise to final latents: the default EDM Euler step
fused with the UNet, any sampler over the guided denoiser (:mod:`svd_jax.samplers`), overlapping windows for
videos longer than the UNet's trained length (:mod:`svd_jax.long_video`), and bidirectional keyframe sampling
(:mod:`svd_jax.keyframes`). Each draws its noise per video from the video's seed, so a video in a batch is the
video alone.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svd_jax import keyframes, long_video, samplers, scheduler, sharding
from svd_jax.denoiser import Conditioning
from svd_jax.errors import check_finite, stage
from svd_jax.progress import StepBar
from svd_jax.settings import positive_int, seed_key, seed_keys, seeds
from svd_jax.step_cache import CachedDenoiser


def seeded_noise(seeds: list[int], shape, part: int) -> jax.Array:
    """Per video, from its own seed's key split in two: part 0 is the augmentation noise [H, W, 3], part 1 the
    initial latent noise [F, h, w, C]."""
    return _noise_rows(seed_keys(seeds), tuple(shape), part)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noise_rows(keys, shape: tuple, part: int) -> jax.Array:
    """One program for every video's noise (per key: the same values as drawing from that key alone)."""
    return jax.vmap(lambda key: jax.random.normal(jax.random.split(key)[part], shape, jnp.float32))(keys)


def checked_array(value, shape, name: str) -> jax.Array:
    array = jnp.asarray(value, jnp.float32)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (channels last), got {list(array.shape)}")
    return array


class Sampling:
    """The sampling methods of :class:`~svd_jax.pipeline.Pipeline`, which provides ``models``, ``mesh``,
    ``denoiser(conditioning)``, and the weights and settings behind them."""

    def sample(self, conditioning: Conditioning, *, num_frames: int | None = None,
               num_inference_steps: int | None = None, sigmas: Sequence[float] | None = None,
               seed: int | Sequence[int] | None = None, latents=None, callback_on_step_end: Callable | None = None,
               progress: bool | str = True, sampler: str = "euler", schedule: str = "karras",
               sampler_options: dict | None = None, cache_interval: int = 1) -> jax.Array:
        """A sampler from noise to the final latents ``[B, F, h, w, C]`` (scaled, float32): EDM Euler on Karras
        sigmas (the original code's) unless ``sampler`` (see :mod:`svd_jax.samplers`) with its keyword
        ``sampler_options`` or ``schedule`` (:data:`svd_jax.scheduler.SCHEDULE_KINDS`) say otherwise; the noise
        the stochastic samplers add is drawn per video from ``seed``. ``cache_interval`` N > 1 runs the whole
        UNet every N evaluations and only its shallow branch in between (:mod:`svd_jax.step_cache`).

        ``latents`` (unit variance; scaled by the schedule here) replaces the noise drawn from ``seed``.
        ``callback_on_step_end(step, sigma, latents)`` runs after every step with an array it may keep; returning
        an array replaces the latents. ``progress``: a bar that advances as steps finish (``False``: none;
        ``"verbose"``: also each step's time)."""
        samplers.check_sampler(sampler)
        guided, batch = conditioning.guided, conditioning.num_videos
        if num_frames is None:
            num_frames = (latents.shape[1] if latents is not None and np.ndim(latents) == 5
                          else len(conditioning.guidance_scales) if guided else self.models.unet.config.num_frames)
        positive_int(num_frames, "num_frames")
        if guided and len(conditioning.guidance_scales) != num_frames:
            raise ValueError(f"the conditioning's guidance scales are for {len(conditioning.guidance_scales)} "
                             f"frames, not num_frames={num_frames}")
        sched = self._schedule(num_inference_steps, sigmas, schedule)
        chosen = seeds(seed, batch)
        latent_shape = (num_frames, *conditioning.image_latents.shape[1:3], self.models.unet.config.out_channels)
        if latents is not None:
            noise = checked_array(latents, (batch, *latent_shape), "latents")
        else:
            noise = seeded_noise(chosen, latent_shape, 1)
        x = sharding.place_rows(noise * np.float32(sched.init_noise_sigma), self.mesh, conditioning.image_latents)
        if sampler != "euler" or sampler_options or cache_interval != 1:
            denoiser = (self.denoiser(conditioning) if cache_interval == 1 else
                        CachedDenoiser(*self._split(self.models.unet, "unet"), conditioning, cache_interval, self.mesh))
            with stage("sampling", "num_frames, height and width, or the number of images"):
                x = self._sample_with(sampler, denoiser, x, sched.sigmas, chosen, sampler_options,
                                      callback_on_step_end, progress)
            check_finite(x, "the sampled latents")
            return x
        denoiser = self.denoiser(conditioning)
        with stage("sampling", "num_frames, height and width, or the number of images"), \
                StepBar(sched.num_steps, "denoising", enabled=bool(progress), verbose=progress == "verbose") as bar:
            for i in range(sched.num_steps):
                x = denoiser.euler_step(x, sched.sigmas[i], sched.sigmas[i + 1], sched.timesteps[i])
                bar.step_done(x)
                if callback_on_step_end is not None:
                    replaced = callback_on_step_end(i, float(sched.sigmas[i]), x)
                    # The step donates its input: give it a copy, never an array the callback may have kept (one
                    # compiled step either way; a copy of the latents is small next to a UNet evaluation).
                    x = x if replaced is None else checked_array(replaced, x.shape,
                                                                   "latents returned by callback_on_step_end")
                    x = sharding.place_rows(jnp.array(x, copy=True), self.mesh, conditioning.image_latents)
        check_finite(x, "the sampled latents")
        return x

    def _sample_with(self, name: str, denoiser, x, sigmas, chosen_seeds, options, callback_on_step_end,
                     progress: bool | str):
        """:func:`svd_jax.samplers.sample` with the progress bar, the step callback and noise keys per video."""
        with StepBar(len(sigmas) - 1, "denoising", enabled=bool(progress), verbose=progress == "verbose") as bar:

            def after_step(i, sigma, x):
                bar.step_done(x)
                replaced = None if callback_on_step_end is None else callback_on_step_end(i, sigma, x)
                if replaced is None:
                    return None
                replaced = checked_array(replaced, x.shape, "latents returned by callback_on_step_end")
                return sharding.place_rows(replaced, self.mesh, x)

            options = dict(options or {})
            # each video's own stream, apart from its augmentation and latent noise (parts 0 and 1 of its key)
            options.setdefault("key", [jax.random.fold_in(seed_key(s), 2) for s in chosen_seeds])
            return samplers.sample(name, denoiser, x, sigmas, callback=after_step, **options)

    def _schedule(self, num_inference_steps, sigmas, kind: str = "karras") -> scheduler.Schedule:
        if sigmas is None:
            num_inference_steps = self._settings(num_inference_steps=num_inference_steps)["num_inference_steps"]
            positive_int(num_inference_steps, "num_inference_steps")
        return scheduler.schedule(num_steps=None if sigmas is not None else num_inference_steps, sigmas=sigmas,
                                  kind=kind)

    def sample_windowed(self, conditioning: Conditioning, *, num_frames: int, window_size: int,
                        window_stride: int | None = None, num_inference_steps: int | None = None,
                        sigmas: Sequence[float] | None = None, seed: int | Sequence[int] | None = None,
                        latents=None, callback_on_step_end: Callable | None = None,
                        progress: bool | str = True, sampler: str = "euler", schedule: str = "karras",
                        sampler_options: dict | None = None) -> jax.Array:
        """``num_frames`` frames as overlapping windows of ``window_size`` frames sampled together
        (:mod:`svd_jax.long_video`), every ``window_stride`` frames (default: half a window); the conditioning
        is encoded for ``window_size`` frames. ``sampler`` and ``schedule`` as in :meth:`sample`, over the fused
        windows: one UNet evaluation of all windows per sampler evaluation. ``latents [B, num_frames, h, w, C]``
        replaces the noise drawn from ``seed`` (the first window's draw, re-used shuffled past it)."""
        samplers.check_sampler(sampler)
        positive_int(num_frames, "num_frames")
        positive_int(window_size, "window_size")
        stride = long_video.default_stride(window_size) if window_stride is None else positive_int(
            window_stride, "window_stride")
        if conditioning.guided and len(conditioning.guidance_scales) != window_size:
            raise ValueError(f"the conditioning is for {len(conditioning.guidance_scales)} frames, not the "
                             f"window's {window_size}")
        sched = self._schedule(num_inference_steps, sigmas, schedule)
        batch, frame_shape = conditioning.num_videos, (*conditioning.image_latents.shape[1:3],
                                                       self.models.unet.config.out_channels)
        video_seeds = seeds(seed, batch)
        if latents is not None:
            noise = checked_array(latents, (batch, num_frames, *frame_shape), "latents")
        else:
            first = seeded_noise(video_seeds, (min(window_size, num_frames), *frame_shape), 1)
            noise = jnp.stack([long_video.freenoise(n, num_frames, jax.random.fold_in(seed_key(s), 3))
                               for n, s in zip(first, video_seeds)])
        starts = long_video.window_starts(num_frames, window_size, stride)
        windowed = long_video.WindowedDenoiser(
            self.denoiser(long_video.window_conditioning(conditioning, len(starts))), num_frames, window_size, stride)
        x = sharding.place_rows(noise * np.float32(sched.init_noise_sigma), self.mesh, conditioning.image_latents)
        with stage("sampling", "num_frames, the window size, height and width, or the number of images"):
            x = self._sample_with(sampler, windowed, x, sched.sigmas, video_seeds, sampler_options,
                                  callback_on_step_end, progress)
        check_finite(x, "the sampled latents")
        return x

    def sample_keyframes(self, start: Conditioning, end: Conditioning, start_latent, end_latent, *,
                         guidance_scale: float = 1.0, cfg_pp: bool = True, num_inference_steps: int | None = None,
                         sigmas: Sequence[float] | None = None, seed: int | Sequence[int] | None = None,
                         latents=None, callback_on_step_end: Callable | None = None, progress: bool | str = True,
                         schedule: str = "karras", on_pass: Callable | None = None) -> jax.Array:
        """Bidirectional sampling from the start keyframe to the end one (:mod:`svd_jax.keyframes`): the final
        latents ``[B, F, h, w, C]``. ``start``/``end``: each keyframe's conditioning, encoded with guidance
        (:meth:`encode_conditioning` with ``max_guidance_scale > 1``: its unconditional rows are needed; its
        scales are replaced by ``guidance_scale`` on every frame); ``start_latent``/``end_latent``: the keyframes'
        latents (:meth:`encode_latents`). ``latents`` and ``seed`` as in :meth:`sample`; the noise added back
        between the passes is drawn from each video's seed too. Two guided UNet evaluations per step."""
        if not start.guided or not end.guided:
            raise ValueError("keyframe sampling needs both conditionings encoded with max_guidance_scale > 1")
        num_frames, batch = len(start.guidance_scales), start.num_videos
        if len(end.guidance_scales) != num_frames or end.num_videos != batch:
            raise ValueError("the start and end conditionings must be for the same videos and frame count")
        sched = self._schedule(num_inference_steps, sigmas, schedule)
        latent_shape = (num_frames, *start.image_latents.shape[1:3], self.models.unet.config.out_channels)
        video_seeds = seeds(seed, batch)
        noise = (checked_array(latents, (batch, *latent_shape), "latents") if latents is not None
                 else seeded_noise(video_seeds, latent_shape, 1))
        (start_pair, scales), (end_pair, _) = (keyframes.paired(c, guidance_scale, num_frames) for c in (start, end))
        x = sharding.place_rows(noise * np.float32(sched.init_noise_sigma), self.mesh, start.image_latents)
        renoise = keyframes.seeded_noise_sampler([jax.random.fold_in(seed_key(s), 2) for s in video_seeds],
                                                   latent_shape)
        with stage("sampling", "num_frames, height and width, or the number of images"), \
                StepBar(sched.num_steps, "denoising (keyframes)", enabled=bool(progress),
                        verbose=progress == "verbose") as bar:
            def after_step(i, sigma, latents):
                bar.step_done(latents)
                return None if callback_on_step_end is None else callback_on_step_end(i, sigma, latents)

            x = keyframes.bidirectional_sample(
                self.denoiser(start_pair), self.denoiser(end_pair), x, sched.sigmas,
                checked_array(start_latent, (batch, *latent_shape[1:]), "start_latent"),
                checked_array(end_latent, (batch, *latent_shape[1:]), "end_latent"), scales,
                lambda step, k: sharding.place_rows(renoise(step, k), self.mesh, start.image_latents), cfg_pp=cfg_pp,
                callback=after_step, on_pass=on_pass)
        check_finite(x, "the sampled latents")
        return x
