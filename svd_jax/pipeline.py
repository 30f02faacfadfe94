"""``svd_jax.Pipeline`` and ``svd_jax.generate``: image-to-video, as diffusers' StableVideoDiffusionPipeline.

A :class:`Pipeline` owns what it prepares from a model set (the float32 VAE copy used to encode the conditioning
image, and with a mesh the weights placed on it) and has diffusers' named steps as methods:
:meth:`~Pipeline.encode_conditioning`, :meth:`~Pipeline.sample`, :meth:`~Pipeline.decode`. Weights are read from
the modules at every call, so an in-place update (``nnx.update``, an assignment to ``pipeline.models.unet``) is
used by the next call. The default sampler is the EDM Euler step fused with the UNet in one jitted program
(:class:`svd_jax.denoiser.Denoiser`); the loop over steps is Python, so progress bars, ``callback_on_step_end``
and interruption work as usual. Randomness enters as arrays: the augmentation noise and the initial latent noise
are drawn per video from its seed's key (:func:`svd_jax.settings.seed_key`) unless passed in (``noise=``,
``latents=``), so a video generated in a batch is the same video generated alone, and tests can inject the noise
the PyTorch pipeline used.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx
from jax.sharding import Mesh

from svd_jax import preprocess, scheduler, sharding
from svd_jax.components import recast
from svd_jax.denoiser import Conditioning, Denoiser
from svd_jax.errors import check_finite, stage
from svd_jax.loader import SVDModels
from svd_jax.policy import Policy
from svd_jax.sampling import Sampling, checked_array, seeded_noise
from svd_jax.settings import (DIFFUSERS_DEFAULTS, FPS_RANGE, MOTION_BUCKET_RANGE, OUTPUT_TYPES, PRESETS,
                              Preset, check_conditioning, check_size, positive_int, resolve_settings,
                              seeds, size_multiple)
from svd_jax.vae import decode_latents

__all__ = ["Pipeline", "generate", "check_each_step", "Conditioning", "PRESETS", "Preset", "DIFFUSERS_DEFAULTS",
           "FPS_RANGE", "MOTION_BUCKET_RANGE", "OUTPUT_TYPES", "check_size", "resolve_settings", "size_multiple"]


def _images(image) -> list:
    images = image if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("image must be an image or a non-empty list of images, got an empty list")
    return [preprocess.load_image(im) for im in images]


def check_each_step(step: int, sigma: float, latents) -> None:
    """A ``callback_on_step_end`` that stops sampling at the first step whose latents hold NaN or infinity
    (:class:`svd_jax.errors.NonFiniteError`), at the cost of one device-to-host flag per step. Without it, the
    final latents and the decoded frames are checked once."""
    check_finite(latents, f"the latents after step {step + 1}")


# One program per input size, kept by the persistent cache, instead of a handful of eager operations that a new
# process would compile again.
_clip_preprocess = jax.jit(preprocess.clip_preprocess, static_argnames="size")


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_image(graph, state, clip_pixels):
    return nnx.merge(graph, state)(clip_pixels).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_latents(graph, state, pixels, noise=None, noise_strength=None):
    """The VAE posterior's mean of ``pixels``, with ``noise_strength * noise`` added first when given."""
    if noise is not None:
        pixels = pixels + noise_strength * noise
    mean, _ = nnx.merge(graph, state).encode(pixels)
    return mean.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="guided")
def _conditioning_rows(embeds, image_latents, time_row, guided: bool):
    """The UNet's conditioning rows: ``embeds [B, 1, D]``, ``image_latents`` and ``time_ids`` (``time_row`` per
    video), with the unconditional rows (zero embeddings and latents) first when ``guided``."""
    embeds, time_ids = embeds[:, None, :], jnp.tile(time_row[None], (embeds.shape[0], 1))
    if guided:
        embeds = jnp.concatenate([jnp.zeros_like(embeds), embeds])
        image_latents = jnp.concatenate([jnp.zeros_like(image_latents), image_latents])
        time_ids = jnp.concatenate([time_ids, time_ids])
    return embeds, image_latents, time_ids


@functools.partial(jax.jit, static_argnames="as_uint8")
def _output_frames(frames, as_uint8: bool):
    """The decoder's [-1, 1] frames as float32 in [0, 1], or rounded to uint8."""
    frames = jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(frames * 255).astype(jnp.uint8) if as_uint8 else frames


def _is_float32(module) -> bool:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return jnp.dtype(module.dtype) == jnp.float32 and all(leaf.dtype == jnp.float32 for leaf in leaves)


class Pipeline(Sampling):
    """Image-to-video with one model set (:class:`~svd_jax.loader.SVDModels`), as diffusers'
    ``StableVideoDiffusionPipeline``: ``pipeline(image, ...)`` takes :func:`generate`'s arguments.

    ``mesh`` (see :mod:`svd_jax.sharding`) splits the videos and guidance halves across devices; weights not
    already on it are replicated once and kept. ``pipeline.models`` is read at every call: update its modules in
    place (``nnx.update``) or assign new ones and the next call uses them. Keep one pipeline for repeated calls;
    dropping it frees what it prepared. The steps are public for custom loops::

        pipe = svd_jax.Pipeline(models)
        cond = pipe.encode_conditioning(image, height=576, width=1024, num_frames=25, seed=0)
        latents = pipe.sample(cond, num_inference_steps=25, seed=0)
        frames = pipe.decode(latents, decode_chunk_size=8)
    """

    def __init__(self, models: SVDModels, mesh: Mesh | None = None):
        models.require("image_encoder", "unet", "vae")
        self.models = models
        self.mesh = mesh
        self._replicas: dict[str, sharding.Replicas] = {}
        self._float32_vae: tuple[list, object] | None = None  # (the VAE's weights it was cast from, the copy)

    def refresh(self) -> None:
        """Drop everything prepared from the weights (placed copies, the float32 VAE); the next call prepares
        them again. Not needed to pick up new weights (every call checks), only to free the memory at once."""
        self._replicas = {}
        self._float32_vae = None

    def _split(self, module, name: str):
        graph, state = nnx.split(module)
        if self.mesh is not None:
            state = self._replicas.setdefault(name, sharding.Replicas(self.mesh))(state)
        return graph, state

    def _encoding_vae(self):
        """The VAE that encodes the conditioning image: in float32 whatever its dtype when its config says so
        (diffusers' ``force_upcast``), as a copy only when it is not float32 already."""
        vae = self.models.vae
        if not vae.config.force_upcast or _is_float32(vae):
            self._float32_vae = None
            return vae
        sources = jax.tree.leaves(nnx.state(vae, nnx.Param))
        cached = self._float32_vae
        if cached is None or len(cached[0]) != len(sources) or any(a is not b for a, b in zip(cached[0], sources)):
            self._float32_vae = None  # free the old copy before casting the new one
            cached = self._float32_vae = (sources, recast(vae, "vae", Policy.float32(self.models.policy.attention_impl)))
        return cached[1]

    # ---- the named steps ---------------------------------------------------------------------------------

    def _settings(self, **given) -> dict:
        return resolve_settings(self.models.settings, self.models.unet.config, **given)

    def encode_conditioning(self, image, *, height: int | None = None, width: int | None = None,
                            num_frames: int | None = None,
                            min_guidance_scale: float = 1.0, max_guidance_scale: float = 3.0,
                            guidance: str = "linear", fps: int = 7, motion_bucket_id: int = 127,
                            noise_aug_strength: float = 0.02, seed: int | Sequence[int] | None = None,
                            noise=None) -> Conditioning:
        """CLIP embedding and noise-augmented VAE latent of each image, the conditioning ids and the per-frame
        guidance scales, batched as [uncond, cond] when ``max_guidance_scale > 1``. ``noise [B, H, W, 3]``
        replaces the augmentation noise drawn from ``seed``; sizes default as in :func:`generate`."""
        models = self.models
        size = self._settings(height=height, width=width, num_frames=num_frames)
        height, width, num_frames = size["height"], size["width"], positive_int(size["num_frames"], "num_frames")
        check_size(height, width, models.unet.config, models.vae.config)
        check_conditioning(fps, motion_bucket_id, noise_aug_strength)
        images = _images(image)
        batch = len(images)
        if noise is not None:
            aug_noise = checked_array(noise, (batch, height, width, 3), "noise")
        else:
            aug_noise = seeded_noise(seeds(seed, batch), (height, width, 3), 0)
        clip_size = models.image_encoder.config.image_size
        with stage("encoding the conditioning image", "height and width, or the number of images"):
            clip_pixels = jnp.concatenate([_clip_preprocess(preprocess.clip_input(im), size=clip_size)
                                           for im in images])
            embeds = _encode_image(*self._split(models.image_encoder, "image_encoder"), clip_pixels)
            pixels = np.stack([preprocess.prepare_image(im, height, width) for im in images])
            image_latents = _encode_latents(*self._split(self._encoding_vae(), "vae_encoder"), pixels, aug_noise,
                                            np.float32(noise_aug_strength))
        guided = max_guidance_scale > 1.0
        embeds, image_latents, time_ids = _conditioning_rows(
            embeds, image_latents, np.array([fps - 1, motion_bucket_id, noise_aug_strength], np.float32), guided)
        scales = scheduler.guidance_scales(min_guidance_scale, max_guidance_scale, num_frames, kind=guidance)
        embeds, image_latents, time_ids = (sharding.place_rows(a, self.mesh) for a in (embeds, image_latents, time_ids))
        return Conditioning(embeds, image_latents, time_ids, jax.device_put(scales) if guided else None)

    def encode_latents(self, image, *, height: int | None = None, width: int | None = None) -> jax.Array:
        """The scaled VAE latent of each clean image ``[B, h, w, C]`` (the posterior's mode times the VAE's
        scaling factor): what a keyframe's latent frame is pinned to."""
        size = self._settings(height=height, width=width)
        check_size(size["height"], size["width"], self.models.unet.config, self.models.vae.config)
        pixels = np.stack([preprocess.prepare_image(im, size["height"], size["width"]) for im in _images(image)])
        mean = _encode_latents(*self._split(self._encoding_vae(), "vae_encoder"), pixels)
        return sharding.place_rows(mean * jnp.float32(self.models.vae.config.scaling_factor), self.mesh)

    def denoiser(self, conditioning: Conditioning) -> Denoiser:
        """The guided UNet with the current weights and ``conditioning``: ``denoiser(x, sigma)`` for samplers over
        a denoiser, ``denoiser.euler_step`` for the default one."""
        return Denoiser(*self._split(self.models.unet, "unet"), conditioning, self.mesh)

    def decode(self, latents, decode_chunk_size: int | None = None, output_type: str = "np"):
        """Frames ``[B, F, H, W, 3]`` from the sampler's latents, ``decode_chunk_size`` frames per VAE call
        (default: a whole video): float32 in [0, 1] (``"np"``), uint8 (``"uint8"``), or a list of B lists of F
        PIL images (``"pil"``, as diffusers)."""
        if output_type not in ("np", "uint8", "pil"):
            raise ValueError(f"decode's output_type must be 'np', 'uint8' or 'pil', got {output_type!r}")
        if decode_chunk_size is not None:
            positive_int(decode_chunk_size, "decode_chunk_size")
        if self.mesh is not None:  # decoding runs on one device (the VAE is small next to the sampling loop)
            latents = jax.device_get(latents)
        # One video at a time: diffusers flattens the batch, so a chunk that does not divide num_frames would mix
        # two videos in one temporal decode; per video, a video decoded in a batch equals the same video alone.
        num_frames = latents.shape[1]
        with stage("decoding", "decode_chunk_size (down to 1), or height and width"):
            frames = jnp.concatenate([decode_latents(self.models.vae, latents[b:b + 1],
                                                     decode_chunk_size or num_frames) for b in range(latents.shape[0])])
        check_finite(frames, "the decoded frames")
        frames = np.asarray(_output_frames(frames, as_uint8=output_type != "np"))
        return [[PIL.Image.fromarray(f) for f in v] for v in frames] if output_type == "pil" else frames

    def __call__(self, image, *, height: int | None = None, width: int | None = None,
                 num_frames: int | None = None, num_inference_steps: int | None = None, sigmas: Sequence[float] | None = None,
                 min_guidance_scale: float = 1.0, max_guidance_scale: float = 3.0, guidance: str = "linear",
                 fps: int = 7, motion_bucket_id: int = 127, noise_aug_strength: float = 0.02,
                 decode_chunk_size: int | None = None, seed: int | Sequence[int] | None = None, latents=None,
                 noise=None, output_type: str = "np", callback_on_step_end: Callable | None = None,
                 progress: bool | str = True, sampler: str = "euler", schedule: str = "karras",
                 sampler_options: dict | None = None, cache_interval: int = 1, last_image=None,
                 loop: bool = False, keyframe_guidance_scale: float = 1.0, cfg_pp: bool = True,
                 window_size: int | None = None, window_stride: int | None = None):
        """:meth:`encode_conditioning`, :meth:`sample` (or :meth:`sample_keyframes`, :meth:`sample_windowed`) and
        :meth:`decode` in turn; see :func:`generate`."""
        unet_config, vae_scale = self.models.unet.config, self.models.vae.config.downsample_factor
        size = self._settings(height=height, width=width, num_frames=num_frames,
                              num_inference_steps=num_inference_steps)
        height, width, num_frames, num_inference_steps = (
            size["height"], size["width"], size["num_frames"], size["num_inference_steps"])
        positive_int(num_frames, "num_frames")
        if sigmas is None:
            positive_int(num_inference_steps, "num_inference_steps")
        check_size(height, width, unet_config, self.models.vae.config)
        if decode_chunk_size is not None:
            positive_int(decode_chunk_size, "decode_chunk_size")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        images = _images(image)
        chosen = seeds(seed, len(images))
        if latents is not None:
            latents = checked_array(latents, (len(images), num_frames, height // vae_scale, width // vae_scale,
                                               unet_config.out_channels), "latents")
        encode = functools.partial(self.encode_conditioning, height=height, width=width, guidance=guidance, fps=fps,
                                   motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                                   seed=chosen, noise=noise)
        steps = dict(num_inference_steps=num_inference_steps, sigmas=sigmas, seed=chosen, latents=latents,
                     callback_on_step_end=callback_on_step_end, progress=progress, schedule=schedule)
        if loop or last_image is not None:
            if loop and last_image is not None:
                raise ValueError("loop=True ends on the start image: pass last_image or loop, not both")
            if sampler != "euler" or sampler_options or cache_interval != 1 or window_size is not None:
                raise ValueError("keyframe sampling (last_image, loop) runs its own bidirectional Euler sampler: "
                                 "sampler, sampler_options, cache_interval and window_size do not apply")
            ends = images if loop else _images(last_image)
            if len(ends) != len(images):
                raise ValueError(f"got {len(ends)} last images for {len(images)} images")
            # the keyframe sampler combines the [uncond, cond] rows itself, at keyframe_guidance_scale: any
            # max_guidance_scale > 1 only asks for both rows here
            start, end = (encode(ims, min_guidance_scale=1.0, max_guidance_scale=2.0, num_frames=num_frames)
                          for ims in (images, ends))
            x = self.sample_keyframes(start, end, self.encode_latents(images, height=height, width=width),
                                      self.encode_latents(ends, height=height, width=width),
                                      guidance_scale=keyframe_guidance_scale, cfg_pp=cfg_pp, **steps)
        elif window_size is not None:
            if cache_interval != 1:
                raise ValueError("cache_interval does not apply to windowed sampling (window_size)")
            cond = encode(images, min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale,
                          num_frames=positive_int(window_size, "window_size"))
            x = self.sample_windowed(cond, num_frames=num_frames, window_size=window_size, window_stride=window_stride,
                                     sampler=sampler, sampler_options=sampler_options, **steps)
        else:
            cond = encode(images, min_guidance_scale=min_guidance_scale, max_guidance_scale=max_guidance_scale,
                          num_frames=num_frames)
            x = self.sample(cond, num_frames=num_frames, sampler=sampler, sampler_options=sampler_options,
                            cache_interval=cache_interval, **steps)
        if output_type == "latent":
            return x
        return self.decode(x, decode_chunk_size, output_type)


def generate(image, model: SVDModels, *, mesh: Mesh | None = None, **options):
    """Generate videos from images; names and defaults as diffusers' ``StableVideoDiffusionPipeline``.

    ``image``: a path, PIL image or numpy array, or a list of them (one video each). ``height``, ``width``,
    ``num_frames`` and ``num_inference_steps`` default to the model's own settings (the tiny model's: 64x96, 4
    frames, 2 steps), else diffusers' 576x1024, the UNet's trained frame count and 25 steps. ``seed``: one int
    (video ``i`` uses ``seed + i``) or one per image. ``latents [B, F, h, w, 4]`` (unit-variance, scaled by the
    schedule here) and ``noise [B, H, W, 3]`` (the augmentation noise) replace the drawn noise.
    ``callback_on_step_end(step, sigma, latents)`` runs after every step has finished, with an array it may keep;
    returning an array replaces the latents. ``progress``: a bar that advances as steps finish (``False``: none;
    ``"verbose"``: also each step's time). Returns frames ``[B, F, H, W, 3]``: float32 in [0, 1] (``"np"``),
    uint8 (``"uint8"``), a list of B lists of F PIL images (``"pil"``, as diffusers), or the final scaled latents
    (``"latent"``). See :data:`PRESETS` for the original code's settings per model (``generate(image, model, **PRESETS["svd_xt"])``).
    ``mesh`` (see :mod:`svd_jax.sharding`) splits the videos and guidance halves across devices; results equal
    one device's. ``sampler`` (``"euler"``, ``"heun"``, ``"euler_ancestral"``, ``"dpmpp_2s_ancestral"``,
    ``"dpmpp_2m"``, ``"lms"``, ``"lcm"``) with ``sampler_options`` (k-diffusion's, e.g. ``s_churn``),
    ``schedule`` (``"karras"``, ``"ays"``, ``"exponential"``, ``"polyexponential"``, ``"animatelcm"``) and
    ``cache_interval`` (step caching): see :meth:`Pipeline.sample`. ``last_image`` (one per image) makes a video
    from ``image`` to ``last_image`` by bidirectional keyframe sampling (:mod:`svd_jax.keyframes`; two UNet
    evaluations per step), ``loop=True`` one that returns to ``image``; their guidance is one
    ``keyframe_guidance_scale`` on every frame, CFG++ (``cfg_pp``) by default, and ``min/max_guidance_scale`` do
    not apply. ``window_size`` (e.g. the UNet's trained count, for ``num_frames`` beyond it) samples overlapping
    windows of that many frames together, one every ``window_stride`` frames (default: half a window), fused at
    every step (:mod:`svd_jax.long_video`); without it all frames are one window, as diffusers does. A thin wrapper over a :class:`Pipeline` made for this call: keep a ``Pipeline`` instead for
    repeated calls with a mesh or half-precision weights, so what it prepares is reused.
    """
    return Pipeline(model, mesh)(image, **options)


# generate takes exactly Pipeline.__call__'s arguments (plus the model and mesh): show them in help() and IDEs
generate.__signature__ = inspect.Signature(
    [inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=SVDModels),
     *list(inspect.signature(Pipeline.__call__).parameters.values())[2:],
     inspect.Parameter("mesh", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Mesh | None)])
