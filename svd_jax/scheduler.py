"""EDM schedules for SVD (Karras, AYS, exponential, polyexponential), v-prediction scalings, Euler step, guidance.

Pure functions. Host-side schedules are numpy; the per-step math is `jax.numpy` in float32 and is
jit-friendly (sigmas may be traced scalars). Numerics follow diffusers' `EulerDiscreteScheduler`
configured as SVD's `scheduler_config.json` (v_prediction, continuous timesteps, Karras sigmas
700 -> 0.002, "leading" spacing), which is also sgm's `EulerEDMSampler` with `VScalingWithEDMcNoise`
up to a few ulps in the sigmas (sgm computes them in float32, diffusers in float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0
# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step noise levels for Stable Video Diffusion.
AYS_SVD_SIGMAS = (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002)
SCHEDULE_KINDS = ("karras", "ays", "exponential", "polyexponential", "animatelcm")
# AnimateLCM-SVD's consistency distillation discretised the Karras schedule (700 -> 0.002, rho 7) into 40 levels.
ANIMATELCM_TRAIN_STEPS = 40
GUIDANCE_KINDS = ("linear", "triangle")
_PERIOD_FUSINGS = ("max", "mean", "multiply")


class Schedule(NamedTuple):
    """A sampling schedule.

    sigmas: float32 [num_steps + 1], strictly decreasing, ending in 0.
    timesteps: float32 [num_steps], the UNet's c_noise = 0.25 * ln(sigma) for each non-zero sigma.
    init_noise_sigma: sqrt(max(sigmas)^2 + 1) in float32; the initial latent noise is scaled by it.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return int(num_steps)


def karras_sigmas(
    num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> np.ndarray:
    """Karras et al. (2022) sigmas, float32 [num_steps + 1] ending in 0.

    Computed as diffusers does: a float64 numpy ramp linspace(0, 1, num_steps),
    (max^(1/rho) + ramp * (min^(1/rho) - max^(1/rho)))^rho, a 0 appended, then cast to float32.
    """
    num_steps = _check_num_steps(num_steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    rho = float(rho)
    if not (0.0 < rho < math.inf):
        raise ValueError(f"rho must be positive and finite, got {rho}")
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _check_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (0.0 < sigma_min < sigma_max < math.inf):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return sigma_min, sigma_max


def exponential_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> np.ndarray:
    """Sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0; float32 [num_steps + 1]."""
    return polyexponential_sigmas(num_steps, sigma_min, sigma_max, rho=1.0)


def polyexponential_sigmas(
    num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 1.0
) -> np.ndarray:
    """log sigma = log sigma_min + ramp^rho * (log sigma_max - log sigma_min), ramp from 1 to 0, then 0 appended;
    float32 [num_steps + 1] (computed in float64). rho = 1 is the exponential schedule."""
    num_steps = _check_num_steps(num_steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    if not (0.0 < float(rho) < math.inf):
        raise ValueError(f"rho must be positive and finite, got {rho}")
    ramp = np.linspace(1.0, 0.0, num_steps) ** float(rho)
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    sigmas = np.exp(ramp * (log_max - log_min) + log_min)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def ays_sigmas(num_steps: int, levels: Sequence[float] = AYS_SVD_SIGMAS) -> np.ndarray:
    """Align Your Steps sigmas for SVD, float32 [num_steps + 1].

    The published levels define len(levels) - 1 steps; for another step count they are interpolated linearly in
    log sigma over evenly spaced positions (num_steps + 1 points from the first level to the last). The last
    sigma is then set to 0, so the final step lands on the denoised sample (as ComfyUI's AYS scheduler does).
    """
    num_steps = _check_num_steps(num_steps)
    log_levels = np.log(np.asarray(levels, np.float64))
    if num_steps + 1 == log_levels.size:
        sigmas = np.asarray(levels, np.float64)
    else:
        positions = np.linspace(0.0, 1.0, log_levels.size)
        # np.interp needs increasing abscissae: interpolate the reversed (increasing) log levels
        sigmas = np.exp(np.interp(np.linspace(0.0, 1.0, num_steps + 1), positions, log_levels[::-1]))[::-1]
    sigmas = sigmas.copy()
    sigmas[-1] = 0.0
    return sigmas.astype(np.float32)


def animatelcm_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                      rho: float = RHO, train_steps: int = ANIMATELCM_TRAIN_STEPS) -> np.ndarray:
    """AnimateLCM-SVD's sampling sigmas, float32 [num_steps + 1]: of the ``train_steps`` Karras levels (ramp
    k / (train_steps - 1)), every (train_steps // num_steps)-th from the largest, then 0. num_steps <= train_steps."""
    num_steps = _check_num_steps(num_steps)
    if num_steps > train_steps:
        raise ValueError(f"the AnimateLCM schedule has at most {train_steps} steps, got {num_steps}")
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    ramp = np.arange(num_steps) * (train_steps // num_steps) / (train_steps - 1)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def sigmas_for(kind: str, num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float | None = None) -> np.ndarray:
    """The float32 sigmas of schedule ``kind`` (see :data:`SCHEDULE_KINDS`); ``rho`` defaults to 7 for Karras and
    1 for polyexponential; AYS has fixed levels and takes neither range nor rho."""
    if kind == "karras":
        return karras_sigmas(num_steps, sigma_min, sigma_max, RHO if rho is None else rho)
    if kind == "exponential":
        return exponential_sigmas(num_steps, sigma_min, sigma_max)
    if kind == "polyexponential":
        return polyexponential_sigmas(num_steps, sigma_min, sigma_max, 1.0 if rho is None else rho)
    if kind == "ays":
        return ays_sigmas(num_steps)
    if kind == "animatelcm":
        return animatelcm_sigmas(num_steps, sigma_min, sigma_max, RHO if rho is None else rho)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULE_KINDS}")


def check_sigmas(sigmas) -> np.ndarray:
    """User sigmas as a float32 schedule: 1-D, finite, non-negative, strictly decreasing, a 0 appended if missing."""
    arr = np.asarray(sigmas)
    if arr.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"sigmas must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sigmas must be finite, got {arr.tolist()}")
    if np.any(arr < 0):
        raise ValueError(f"sigmas must be non-negative, got {arr.tolist()}")
    if arr.size and arr[-1] != 0:
        arr = np.concatenate([arr, np.zeros(1, np.float32)])
    if arr.size < 2:
        raise ValueError(f"sigmas must hold at least one non-zero sigma, got {np.asarray(sigmas).tolist()}")
    if np.any(np.diff(arr) >= 0):
        raise ValueError(f"sigmas must be strictly decreasing (after float32 rounding), got {arr.tolist()}")
    return arr


def schedule(
    num_steps: int | None = None,
    sigmas: Sequence[float] | np.ndarray | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float | None = None,
    kind: str = "karras",
) -> Schedule:
    """The schedule for `num_steps` steps of schedule `kind` (Karras by default, see :func:`sigmas_for`), or for
    user-given `sigmas` (exactly one of the two).

    User sigmas are cast to float32 and get a trailing 0 appended when their last value is not 0
    (diffusers' `set_timesteps(sigmas=...)` instead treats the last given value as the final sigma,
    so pass the 0 explicitly for identical behaviour). They must be 1-D, non-negative and strictly
    decreasing.
    """
    if (num_steps is None) == (sigmas is None):
        raise ValueError("pass exactly one of num_steps or sigmas")
    if sigmas is None:
        sig = sigmas_for(kind, num_steps, sigma_min, sigma_max, rho)
    else:
        sig = check_sigmas(sigmas)
    # log of the float32 sigmas, correctly rounded to float32 (diffusers: torch float32 log).
    timesteps = (0.25 * np.log(sig[:-1].astype(np.float64))).astype(np.float32)
    max_sigma = sig.max()
    init_noise_sigma = float(np.sqrt(max_sigma * max_sigma + np.float32(1.0), dtype=np.float32))
    return Schedule(sigmas=sig, timesteps=timesteps, init_noise_sigma=init_noise_sigma)


# --- v-prediction EDM scalings (sigma_data = 1), float32 ---------------------------------------


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def c_in(sigma):
    """Input scaling 1 / sqrt(sigma^2 + 1)."""
    sigma = _f32(sigma)
    return 1.0 / jnp.sqrt(sigma * sigma + 1.0)


def c_out(sigma):
    """Output scaling -sigma / sqrt(sigma^2 + 1) (v-prediction)."""
    sigma = _f32(sigma)
    return -sigma / jnp.sqrt(sigma * sigma + 1.0)


def c_skip(sigma):
    """Skip scaling 1 / (sigma^2 + 1)."""
    sigma = _f32(sigma)
    return 1.0 / (sigma * sigma + 1.0)


def c_noise(sigma):
    """The UNet's timestep input, 0.25 * ln(sigma)."""
    return 0.25 * jnp.log(_f32(sigma))


def scale_model_input(sample, sigma):
    """sample / sqrt(sigma^2 + 1) in float32, written as diffusers' `scale_model_input` (a division)."""
    sigma = _f32(sigma)
    return _f32(sample) / jnp.sqrt(sigma * sigma + 1.0)


def denoised(sample, model_output, sigma):
    """The model's x0 estimate: model_output * c_out + sample * c_skip, in float32."""
    sigma = _f32(sigma)
    sample = _f32(sample)
    model_output = _f32(model_output)
    return model_output * c_out(sigma) + sample / (sigma * sigma + 1.0)


def euler_step(sample, model_output, sigma, sigma_next):
    """One Euler step from sigma to sigma_next on the raw v-prediction `model_output`.

    As diffusers' `EulerDiscreteScheduler.step` (v_prediction, s_churn=0): x0 = denoised(...),
    d = (x - x0) / sigma, x + (sigma_next - sigma) * d. Computed and returned in float32 whatever
    the input dtypes (diffusers casts the result back to the model output's dtype; here the sampler
    state stays float32).
    """
    sigma = _f32(sigma)
    sigma_next = _f32(sigma_next)
    sample = _f32(sample)
    derivative = (sample - denoised(sample, model_output, sigma)) / sigma
    return sample + derivative * (sigma_next - sigma)


# --- classifier-free guidance --------------------------------------------------------------------


def _check_periods(period) -> list[float]:
    periods = [period] if np.isscalar(period) else list(period)
    if not periods:
        raise ValueError("period must be a positive number or a non-empty sequence of them")
    for p in periods:
        if isinstance(p, bool) or not np.isscalar(p) or not (0.0 < float(p) < math.inf):
            raise ValueError(f"period must be positive and finite, got {period!r}")
    return [float(p) for p in periods]


def _triangle_wave(num_frames: int, periods: list[float], period_fusing: str) -> np.ndarray:
    """sgm TrianglePredictionGuider: v = linspace(0, 1, T); 2 * |v/p - floor(v/p + 1/2)|, fused over periods."""
    values = np.linspace(0.0, 1.0, num_frames).astype(np.float32)
    waves = []
    for p in periods:
        x = values / np.float32(p)
        waves.append(np.float32(2.0) * np.abs(x - np.floor(x + np.float32(0.5))))
    stacked = np.stack(waves)
    if period_fusing == "max":
        return stacked.max(axis=0)
    if period_fusing == "mean":
        return (stacked.sum(axis=0) / np.float32(len(periods))).astype(np.float32)
    return stacked.prod(axis=0)


def guidance_scales(
    min_scale: float,
    max_scale: float,
    num_frames: int,
    kind: str = "linear",
    period: float | Sequence[float] = 1.0,
    period_fusing: str = "max",
) -> np.ndarray:
    """Per-frame guidance scales, float32 [num_frames].

    "linear": linspace(min_scale, max_scale, num_frames) (diffusers' pipeline and sgm's
    LinearPredictionGuider): frame 0 gets min_scale, the last frame max_scale.
    "triangle": sgm's TrianglePredictionGuider: a triangle wave over v = linspace(0, 1, T) with the
    given period(s) (fused by `period_fusing` when several), mapped to [min_scale, max_scale]. With
    period 1 it rises from min_scale at frame 0 to max_scale mid-video and falls back.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"unknown guidance kind {kind!r}; expected one of {GUIDANCE_KINDS}")
    if not (math.isfinite(min_scale) and math.isfinite(max_scale)):
        raise ValueError(f"guidance scales must be finite, got min_scale={min_scale}, max_scale={max_scale}")
    num_frames = int(num_frames)
    if kind == "linear":
        return np.linspace(float(min_scale), float(max_scale), num_frames).astype(np.float32)
    if period_fusing not in _PERIOD_FUSINGS:
        raise ValueError(f"unknown period_fusing {period_fusing!r}; expected one of {_PERIOD_FUSINGS}")
    wave = _triangle_wave(num_frames, _check_periods(period), period_fusing)
    return (wave * np.float32(max_scale - min_scale) + np.float32(min_scale)).astype(np.float32)


def apply_guidance(uncond, cond, scales):
    """uncond + scales * (cond - uncond) in float32, scales [F] broadcast over video [B, F, h, w, C]."""
    uncond = _f32(uncond)
    cond = _f32(cond)
    scales = _f32(scales)
    if uncond.shape != cond.shape or uncond.ndim != 5:
        raise ValueError(f"uncond and cond must both be [B, F, h, w, C], got {uncond.shape} and {cond.shape}")
    if scales.shape != (uncond.shape[1],):
        raise ValueError(f"scales must have shape [F]=({uncond.shape[1]},), got {scales.shape}")
    return uncond + scales[None, :, None, None, None] * (cond - uncond)
