"""``svd_jax.generate``: image-to-video with the EDM Euler sampler, as diffusers' StableVideoDiffusionPipeline.

The denoising step is one jitted function of ``(unet state, latents, sigma, sigma_next, c_noise, conditioning)``;
the loop over steps is Python, so progress bars, ``callback_on_step_end`` and interruption work as usual.
Randomness enters as arrays: the augmentation noise and the initial latent noise are drawn per video from
``jax.random.key(seed)`` unless passed in (``noise=``, ``latents=``), so a video generated in a batch is the same
video generated alone, and tests can inject the noise the PyTorch pipeline used.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from svd_jax import preprocess, scheduler, sharding
from svd_jax.components import recast
from svd_jax.loader import SVDModels
from svd_jax.policy import Policy
from svd_jax.progress import StepBar
from svd_jax.vae import decode_latents

# Sampler settings of the original code (sgm) per model, and diffusers' pipeline defaults. fps is the frame
# rate given to the pipeline; the model is conditioned on fps - 1 (sgm's fps_id 6 == fps 7).
PRESETS = {
    "diffusers": dict(num_inference_steps=25, min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7,
                      motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=None),
    "svd": dict(num_frames=14, num_inference_steps=25, min_guidance_scale=1.0, max_guidance_scale=2.5, fps=7,
                motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=14),
    "svd_xt": dict(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5, max_guidance_scale=3.0, fps=7,
                   motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=14),
    "svd_xt_1_1": dict(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5, max_guidance_scale=3.0, fps=7,
                       motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=7),
}
# Conditioning values the released models were trained on; outside them generation runs but is unreliable.
MOTION_BUCKET_RANGE = (0, 255)
FPS_RANGE = (3, 30)
OUTPUT_TYPES = ("np", "uint8", "pil", "latent")
# diffusers' defaults for what neither a call nor the model's own settings give (num_frames: the UNet's count)
DIFFUSERS_DEFAULTS = {"height": 576, "width": 1024, "num_frames": None, "num_inference_steps": 25}


class Conditioning(NamedTuple):
    """What the UNet is conditioned on, batched as [uncond, cond] when guidance is on."""

    image_embeds: jax.Array  # [B', 1, D]
    image_latents: jax.Array  # [B', h, w, 4], the unscaled posterior mode of the noise-augmented image
    added_time_ids: jax.Array  # [B', 3]: fps - 1, motion_bucket_id, noise_aug_strength
    guidance_scales: jax.Array | None  # [F] per-frame scales, None when guidance is off


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def size_multiple(unet_config, vae_config) -> int:
    """Height and width must be multiples of this: the VAE's downsampling times the UNet's (64 for the released
    models, 4 for the tiny one), and of 8, the image processor's rule that diffusers applies."""
    return math.lcm(8, vae_config.downsample_factor * unet_config.downsample_factor)


def check_size(height, width, unet_config, vae_config) -> None:
    """The one size rule, checked from the configs alone (the CLI checks it before loading any weights)."""
    multiple = size_multiple(unet_config, vae_config)
    for value, name in ((height, "height"), (width, "width")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} for this model (its VAE downsamples "
                             f"by {vae_config.downsample_factor}, its UNet by {unet_config.downsample_factor}), "
                             f"got {value!r}")


def resolve_settings(model_settings: dict, unet_config, **given) -> dict:
    """``height``, ``width``, ``num_frames`` and ``num_inference_steps``: as given, else the model's suggested
    settings (:attr:`SVDModels.settings`, e.g. the tiny model's small size), else diffusers' defaults (576x1024,
    25 steps) and the UNet's trained frame count."""
    defaults = {**DIFFUSERS_DEFAULTS, "num_frames": unet_config.num_frames, **model_settings}
    return {name: defaults[name] if given.get(name) is None else given[name] for name in DIFFUSERS_DEFAULTS}


def _check_arguments(num_frames, num_inference_steps, sigmas, height, width, decode_chunk_size, fps,
                     motion_bucket_id, noise_aug_strength, output_type, unet_config, vae_config):
    _positive_int(num_frames, "num_frames")
    if sigmas is None:
        _positive_int(num_inference_steps, "num_inference_steps")
    check_size(height, width, unet_config, vae_config)
    if decode_chunk_size is not None:
        _positive_int(decode_chunk_size, "decode_chunk_size")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if noise_aug_strength < 0:
        raise ValueError(f"noise_aug_strength must be >= 0, got {noise_aug_strength}")
    if not MOTION_BUCKET_RANGE[0] <= motion_bucket_id <= MOTION_BUCKET_RANGE[1]:
        warnings.warn(f"motion_bucket_id {motion_bucket_id} is outside the trained range {MOTION_BUCKET_RANGE}",
                      stacklevel=3)
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        warnings.warn(f"fps {fps} is outside the trained range {FPS_RANGE}", stacklevel=3)


def _seeds(seed, batch: int) -> list[int]:
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} images")
    return seeds


def _draw_noise(seeds: list[int], image_shape, latent_shape):
    """Per video: augmentation noise [H, W, 3] then latent noise [F, h, w, C], each video from its own seed."""
    aug, lat = [], []
    for s in seeds:
        aug_key, latent_key = jax.random.split(jax.random.key(s))
        aug.append(jax.random.normal(aug_key, image_shape, jnp.float32))
        lat.append(jax.random.normal(latent_key, latent_shape, jnp.float32))
    return jnp.stack(aug), jnp.stack(lat)


# One program per input size, kept by the persistent cache, instead of a handful of eager operations that a new
# process would compile again.
_clip_preprocess = jax.jit(preprocess.clip_preprocess, static_argnames="size")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_image(graph, compute, state, clip_pixels):
    return nnx.merge(graph, state)(clip_pixels.astype(compute)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_latents(graph, state, pixels):
    vae = nnx.merge(graph, state)
    mean, _ = vae.encode(pixels.astype(vae.encoder.conv_in.dtype))
    return mean.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _denoise_step(graph, compute, mesh, state, latents, sigma, sigma_next, c_noise, cond: Conditioning):
    """One Euler step: the UNet on [uncond, cond] rows (or cond only), guidance, the update; float32 state."""
    unet = nnx.merge(graph, state)
    guided = cond.guidance_scales is not None
    model_in = jnp.concatenate([latents, latents]) if guided else latents
    scaled = scheduler.scale_model_input(model_in, sigma)
    image_latents = jnp.broadcast_to(cond.image_latents[:, None], scaled.shape[:-1] + cond.image_latents.shape[-1:])
    unet_in = jnp.concatenate([scaled, image_latents], axis=-1).astype(compute)
    if mesh is not None:  # the videos and both guidance halves are rows of one batch: split them
        unet_in = jax.lax.with_sharding_constraint(unet_in, sharding.rows(mesh, unet_in.shape[0], unet_in.ndim))
    timestep = jnp.full((unet_in.shape[0],), c_noise, jnp.float32)
    out = unet(unet_in, timestep, cond.image_embeds.astype(compute),
               cond.added_time_ids.astype(compute)).astype(jnp.float32)
    if guided:
        uncond, cond_out = jnp.split(out, 2)
        out = scheduler.apply_guidance(uncond, cond_out, cond.guidance_scales)
    return scheduler.euler_step(latents, out, sigma, sigma_next)


class _Compiled:
    """The split (and, with a mesh, placed) weights of one model set. The jitted functions above take the graph
    as a static argument, so any model set of the same structure reuses their compilations."""

    def __init__(self, models: SVDModels, mesh: Mesh | None):
        self.mesh = mesh
        self.compute = models.policy.compute
        self.unet_graph, self.unet_state = nnx.split(models.unet)
        self.encoder_graph, self.encoder_state = nnx.split(models.image_encoder)
        vae = models.vae
        if vae.config.force_upcast and models.policy.compute != jnp.float32:
            # as diffusers: the conditioning image is encoded in float32 (force_upcast), whatever the policy
            vae = recast(vae, "vae", Policy.float32(models.policy.attention_impl))
        self.vae_graph, self.vae_state = nnx.split(vae)
        if mesh is not None:  # parameters loaded for one device are replicated; sharded ones are kept as placed
            self.unet_state, self.encoder_state, self.vae_state = (
                jax.tree.map(lambda a: a if _on_mesh(a, mesh) else jax.device_put(a, sharding.replicated(mesh)), s)
                for s in (self.unet_state, self.encoder_state, self.vae_state))

    def encode_image(self, clip_pixels):
        return _encode_image(self.encoder_graph, self.compute, self.encoder_state, clip_pixels)

    def encode_latents(self, pixels):
        return _encode_latents(self.vae_graph, self.vae_state, pixels)

    def step(self, latents, sigma, sigma_next, c_noise, cond: Conditioning):
        return _denoise_step(self.unet_graph, self.compute, self.mesh, self.unet_state, latents, sigma, sigma_next,
                             c_noise, cond)


def _on_mesh(array, mesh: Mesh) -> bool:
    return isinstance(getattr(array, "sharding", None), NamedSharding) and array.sharding.mesh == mesh


_COMPILED: dict[tuple[int, int], tuple[SVDModels, _Compiled]] = {}


def _compiled(models: SVDModels, mesh: Mesh | None) -> _Compiled:
    key = (id(models), id(mesh))
    entry = _COMPILED.get(key)
    if entry is None or entry[0] is not models or entry[1].mesh is not mesh:
        entry = (models, _Compiled(models, mesh))
        _COMPILED[key] = entry
    return entry[1]


def _place(array, mesh: Mesh | None):
    return array if mesh is None else jax.device_put(array, sharding.rows(mesh, array.shape[0], array.ndim))


def generate(
    image,
    model: SVDModels,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    num_inference_steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    min_guidance_scale: float = 1.0,
    max_guidance_scale: float = 3.0,
    guidance: str = "linear",
    fps: int = 7,
    motion_bucket_id: int = 127,
    noise_aug_strength: float = 0.02,
    decode_chunk_size: int | None = None,
    seed: int | Sequence[int] | None = None,
    latents=None,
    noise=None,
    output_type: str = "np",
    callback_on_step_end: Callable | None = None,
    progress: bool | str = True,
    mesh: Mesh | None = None,
):
    """Generate videos from images; names and defaults as diffusers' ``StableVideoDiffusionPipeline``.

    ``image``: a path, PIL image or numpy array, or a list of them (one video each). ``height``, ``width``,
    ``num_frames`` and ``num_inference_steps`` default to the model's own settings (the tiny model's: 64x96, 4
    frames, 2 steps), else diffusers' 576x1024, the UNet's trained frame count and 25 steps. ``seed``: one int
    (video ``i`` uses ``seed + i``) or one per image. ``latents [B, F, h, w, 4]`` (unit-variance, scaled by the
    schedule here) and ``noise [B, H, W, 3]`` (the augmentation noise) replace the drawn noise.
    ``callback_on_step_end(step, sigma, latents)`` runs after every step has finished; returning an array
    replaces the latents. ``progress``: a bar that advances as steps finish (``False``: none; ``"verbose"``: also
    each step's time). Returns frames ``[B, F, H, W, 3]``: float32 in [0, 1] (``"np"``), uint8 (``"uint8"``),
    a list of B lists of F PIL images (``"pil"``, as diffusers), or the final scaled latents (``"latent"``). See :data:`PRESETS` for the
    original code's settings per model (``generate(image, model, **PRESETS["svd_xt"])``). ``mesh`` (see
    :mod:`svd_jax.sharding`) splits the videos and guidance halves across devices; results equal one device's.
    """
    model.require("image_encoder", "unet", "vae")
    size = resolve_settings(model.settings, model.unet.config, height=height, width=width, num_frames=num_frames,
                            num_inference_steps=num_inference_steps)
    height, width, num_frames, num_inference_steps = (
        size["height"], size["width"], size["num_frames"], size["num_inference_steps"])
    vae_scale = model.vae.config.downsample_factor
    _check_arguments(num_frames, num_inference_steps, sigmas, height, width, decode_chunk_size, fps,
                     motion_bucket_id, noise_aug_strength, output_type, model.unet.config, model.vae.config)
    images = [preprocess.load_image(im) for im in (image if isinstance(image, (list, tuple)) else [image])]
    batch = len(images)
    sched = scheduler.schedule(num_steps=None if sigmas is not None else num_inference_steps, sigmas=sigmas)
    guided = max_guidance_scale > 1.0
    scales = scheduler.guidance_scales(min_guidance_scale, max_guidance_scale, num_frames, kind=guidance)
    latent_shape = (num_frames, height // vae_scale, width // vae_scale, model.unet.config.out_channels)

    aug_noise, latent_noise = _draw_noise(_seeds(seed, batch), (height, width, 3), latent_shape)
    if noise is not None:
        aug_noise = _checked_array(noise, (batch, height, width, 3), "noise")
    if latents is not None:
        latent_noise = _checked_array(latents, (batch, *latent_shape), "latents")

    fns = _compiled(model, mesh)
    clip_size = model.image_encoder.config.image_size
    clip_pixels = jnp.concatenate([_clip_preprocess(preprocess.clip_input(im), size=clip_size) for im in images])
    embeds = fns.encode_image(clip_pixels)[:, None, :]
    pixels = jnp.stack([preprocess.prepare_image(im, height, width) for im in images])
    image_latents = fns.encode_latents(pixels + noise_aug_strength * aug_noise)
    time_ids = jnp.tile(jnp.asarray([[fps - 1, motion_bucket_id, noise_aug_strength]], jnp.float32), (batch, 1))
    if guided:
        embeds = jnp.concatenate([jnp.zeros_like(embeds), embeds])
        image_latents = jnp.concatenate([jnp.zeros_like(image_latents), image_latents])
        time_ids = jnp.concatenate([time_ids, time_ids])
    cond = Conditioning(_place(embeds, mesh), _place(image_latents, mesh), _place(time_ids, mesh),
                        jnp.asarray(scales) if guided else None)

    x = _place(latent_noise * jnp.float32(sched.init_noise_sigma), mesh)
    with StepBar(sched.num_steps, "denoising", enabled=bool(progress), verbose=progress == "verbose") as bar:
        for i in range(sched.num_steps):
            sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
            x = fns.step(x, sigma, sigma_next, sched.timesteps[i], cond)
            bar.step_done(x)
            if callback_on_step_end is not None:
                replaced = callback_on_step_end(i, float(sigma), x)
                if replaced is not None:
                    x = _checked_array(replaced, x.shape, "latents returned by callback_on_step_end")
    if output_type == "latent":
        return x
    if mesh is not None:  # decoding runs on one device (the VAE is small next to the sampling loop)
        x = jax.device_get(x)
    # One video at a time: diffusers flattens the batch, so a chunk that does not divide num_frames would mix two
    # videos in one temporal decode; per video, a video decoded in a batch equals the same video decoded alone.
    frames = jnp.concatenate([decode_latents(model.vae, x[b:b + 1], decode_chunk_size or num_frames)
                              for b in range(batch)])
    frames = jnp.clip(frames.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    if output_type in ("uint8", "pil"):
        frames = np.asarray(jnp.round(frames * 255)).astype(np.uint8)
        return [[PIL.Image.fromarray(f) for f in v] for v in frames] if output_type == "pil" else frames
    return np.asarray(frames)


def _checked_array(value, shape, name: str) -> jax.Array:
    array = jnp.asarray(value, jnp.float32)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (channels last), got {list(array.shape)}")
    return array
