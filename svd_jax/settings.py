"""The arguments of a generation: the sampler presets, the defaults, and the checks every entry point shares
(:class:`svd_jax.Pipeline`, :func:`svd_jax.generate`, the CLI, which checks sizes before loading any weights)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from collections.abc import Iterator, Mapping

import numpy as np

@dataclasses.dataclass(frozen=True)
class Preset(Mapping):
    """Sampler settings for :func:`svd_jax.generate` and :class:`svd_jax.Pipeline`. A preset is also a mapping of
    the settings it sets (fields left None are not set), so ``generate(image, models, **PRESETS["svd_xt"])`` and
    ``dict(preset, num_frames=14)`` work."""

    num_inference_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    num_frames: int | None = None  # None: the UNet's trained count
    decode_chunk_size: int | None = None  # None: a whole video per decode
    sampler: str | None = None  # None: the default (EDM Euler)
    schedule: str | None = None  # None: the default (Karras)

    def _settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def __getitem__(self, name: str):
        return self._settings()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._settings())

    def __len__(self) -> int:
        return len(self._settings())


# Sampler settings of the original code (sgm) per model, and diffusers' pipeline defaults. fps is the frame
# rate given to the pipeline; the model is conditioned on fps - 1 (sgm's fps_id 6 == fps 7).
PRESETS: dict[str, Preset] = {
    "diffusers": Preset(num_inference_steps=25, min_guidance_scale=1.0, max_guidance_scale=3.0),
    "svd": Preset(num_frames=14, num_inference_steps=25, min_guidance_scale=1.0, max_guidance_scale=2.5,
                  decode_chunk_size=14),
    "svd_xt": Preset(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5, max_guidance_scale=3.0,
                     decode_chunk_size=14),
    "svd_xt_1_1": Preset(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5, max_guidance_scale=3.0,
                         decode_chunk_size=7),
    # AnimateLCM-SVD-xt (a consistency-distilled SVD-XT UNet; convert with --unet): its authors' demo settings,
    # with their sampler and schedule
    "animatelcm": Preset(num_frames=25, num_inference_steps=4, min_guidance_scale=1.0, max_guidance_scale=1.2,
                         motion_bucket_id=80, decode_chunk_size=4, sampler="lcm", schedule="animatelcm"),
}
# Conditioning values the released models were trained on; outside them generation runs but is unreliable.
MOTION_BUCKET_RANGE = (0, 255)
FPS_RANGE = (3, 30)
OUTPUT_TYPES = ("np", "uint8", "pil", "latent")
# diffusers' defaults for what neither a call nor the model's own settings give (num_frames: the UNet's count)
DIFFUSERS_DEFAULTS = {"height": 576, "width": 1024, "num_frames": None, "num_inference_steps": 25}


def positive_int(value, name: str) -> int:
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


def check_conditioning(fps, motion_bucket_id, noise_aug_strength) -> None:
    """A negative noise strength is an error; values outside the trained ranges warn (the caller's caller)."""
    for value, name in ((fps, "fps"), (motion_bucket_id, "motion_bucket_id"),
                        (noise_aug_strength, "noise_aug_strength")):
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if noise_aug_strength < 0:
        raise ValueError(f"noise_aug_strength must be >= 0, got {noise_aug_strength}")
    if not MOTION_BUCKET_RANGE[0] <= motion_bucket_id <= MOTION_BUCKET_RANGE[1]:
        warnings.warn(f"motion_bucket_id {motion_bucket_id} is outside the trained range {MOTION_BUCKET_RANGE}",
                      stacklevel=4)
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        warnings.warn(f"fps {fps} is outside the trained range {FPS_RANGE}", stacklevel=4)


# Seeds are 64-bit: any integer in [-2**63, 2**64) is taken modulo 2**64, and each gives its own noise.
SEED_RANGE = (-(2 ** 63), 2 ** 64)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _seed(value, name: str) -> int:
    if not _is_integer(value) or not SEED_RANGE[0] <= int(value) < SEED_RANGE[1]:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64), got {value!r}")
    return int(value) % 2 ** 64


def seeds(seed, batch: int) -> list[int]:
    """One seed per video: ``seed + i`` for an int, the given ones for a list, fresh ones for None; each in
    [0, 2**64)."""
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if _is_integer(seed):
        return [(_seed(seed, "seed") + i) % 2 ** 64 for i in range(batch)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, (list, tuple, np.ndarray)):
        raise ValueError(f"seed must be an integer or a list of integers (one per image), got {seed!r}")
    chosen = [_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
    if len(chosen) != batch:
        raise ValueError(f"got {len(chosen)} seeds for {batch} images")
    return chosen


def seed_key(seed: int):
    """The random key of a seed in [0, 2**64): its high and low 32 bits as the threefry key's two words, so no
    two seeds share a key (``jax.random.key`` keeps only the low 32 bits when 64-bit types are off) and a seed
    below 2**32 gives the key ``jax.random.key(seed)`` gives."""
    import jax

    return jax.random.wrap_key_data(_key_words(seed), impl="threefry2x32")


def seed_keys(seed_list: Sequence[int]):
    """The keys of :func:`seed_key` for several seeds, as one key array ``[len(seed_list)]``."""
    import jax

    words = np.stack([_key_words(seed) for seed in seed_list]) if seed_list else np.zeros((0, 2), np.uint32)
    return jax.random.wrap_key_data(words, impl="threefry2x32")


def _key_words(seed: int) -> np.ndarray:
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
