"""Samplers over a denoiser: k-diffusion's euler, heun, euler_ancestral, dpmpp_2s_ancestral, dpmpp_2m, lms; lcm.

Every sampler takes ``denoise(x, sigma) -> denoised`` (the model's x0 estimate for ``x`` at noise level ``sigma``,
``x = x0 + sigma * noise``), the initial ``x`` (already scaled to the first sigma) and a sigma schedule ending
in 0 (appended when missing, see :func:`svd_jax.scheduler.check_sigmas`), and returns the sample at sigma 0, as
k-diffusion's ``sample_*`` functions do. The options are k-diffusion's: ``s_churn``/``s_tmin``/``s_tmax``/
``s_noise`` for Euler and Heun, ``eta``/``s_noise`` and a ``noise_sampler(sigma, sigma_next) -> noise`` for the
ancestral samplers, ``order`` for LMS. Noise is drawn from ``key`` (a JAX key) unless a noise sampler is given.

The loop over steps is Python, so ``callback(i, sigma, x)`` runs after every step (returning an array replaces
``x``) and the denoiser is called as a plain function: a caller passes one jitted model evaluation and every
sampler, including the two-evaluation ones, reuses its compilation. Every sigma the denoiser sees is a host
float32 computed from the schedule, so a denoiser may derive host-side quantities (the UNet's c_noise) from it.
The per-step updates are small jitted functions of traced scalars, compiled once per shape. Step coefficients
are computed on the host in float64 from the float32 sigmas; the sample stays float32.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from svd_jax import scheduler

Denoiser = Callable[[jax.Array, np.float32], jax.Array]
NoiseSampler = Callable[[float, float], jax.Array]
StepCallback = Callable[[int, float, jax.Array], "jax.Array | None"]


class KeyNoiseSampler:
    """The default ``noise_sampler``: standard normal noise of one shape, a fresh draw per call, from ``key`` (a JAX
    key) or from one key per batch row (a list: row ``b`` from ``key[b]``, so a video's noise does not depend on
    the batch it is sampled in)."""

    def __init__(self, key, shape, dtype=jnp.float32):
        self._key, self._shape, self._dtype = key, tuple(shape), dtype
        self._calls = 0

    def __call__(self, sigma, sigma_next) -> jax.Array:
        self._calls += 1
        if isinstance(self._key, (list, tuple)):
            return jnp.stack([jax.random.normal(jax.random.fold_in(k, self._calls), self._shape[1:], self._dtype)
                              for k in self._key])
        return jax.random.normal(jax.random.fold_in(self._key, self._calls), self._shape, self._dtype)


# --- per-step updates: jitted once per shape, scalars traced ---------------------------------------------------


@jax.jit
def _euler_update(x, denoised, sigma, sigma_next):
    # The same float32 operations, in the same order, as scheduler.euler_step: x + (x - x0) / sigma * dt.
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_next - sigma)


@jax.jit
def _heun_predict(x, denoised, sigma, dt):
    derivative = (x - denoised) / sigma
    return x + derivative * dt, derivative


@jax.jit
def _heun_correct(x, derivative, x_pred, denoised_pred, sigma_next, dt):
    derivative_pred = (x_pred - denoised_pred) / sigma_next
    return x + (derivative + derivative_pred) / 2 * dt


@jax.jit
def _add_noise(x, noise, scale):
    return x + noise * scale


@jax.jit
def _combine(x, x_scale, denoised, denoised_scale):
    """x_scale * x + denoised_scale * denoised: the exponential-integrator (DPM-Solver++) update."""
    return x_scale * x + denoised_scale * denoised


@jax.jit
def _derivative(x, denoised, sigma):
    return (x - denoised) / sigma


@jax.jit
def _multistep(x, derivatives, coefficients):
    for derivative, coefficient in zip(derivatives, coefficients):
        x = x + coefficient * derivative
    return x


def _f32(value) -> np.float32:
    return np.float32(value)


# --- host-side helpers ---------------------------------------------------------------------------------------


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic step's target and the noise added after it (k-diffusion)."""
    if not eta:
        return float(sigma_next), 0.0
    sigma, sigma_next = float(sigma), float(sigma_next)
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """The linear multistep weights of derivatives i, i-1, ..., i-order+1 for the step sigmas[i] -> sigmas[i+1]:
    the integral over that step of each Lagrange basis polynomial through those sigmas (exact, in float64)."""
    t = np.asarray(sigmas, np.float64)
    coefficients = []
    for j in range(order):
        basis = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
        antiderivative = basis.integ()
        coefficients.append(float(antiderivative(t[i + 1]) - antiderivative(t[i])))
    return coefficients


def _churn(s_churn: float, s_tmin: float, s_tmax: float, sigma: float, num_steps: int) -> float:
    return min(s_churn / num_steps, math.sqrt(2.0) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _noise_sampler(noise_sampler, key, x, who: str) -> NoiseSampler:
    if noise_sampler is not None:
        return noise_sampler
    if key is None:
        raise ValueError(f"{who} adds noise: pass key= (a jax.random key) or noise_sampler=")
    return KeyNoiseSampler(key, x.shape)


def _after_step(callback: StepCallback | None, i: int, sigma, x):
    if callback is None:
        return x
    replaced = callback(i, float(sigma), x)
    if replaced is None:
        return x
    replaced = jnp.asarray(replaced, jnp.float32)
    if replaced.shape != x.shape:
        raise ValueError(f"the array returned by the step callback must have shape {list(x.shape)}, "
                         f"got {list(replaced.shape)}")
    return replaced


def _churned_sigma(x, sigma, gamma, s_noise, noise_sampler):
    """Karras et al.'s stochastic churn: raise the noise level from sigma to sigma * (1 + gamma)."""
    sigma_hat = _f32(sigma * _f32(gamma + 1.0))
    if gamma > 0:
        scale = s_noise * math.sqrt(float(sigma_hat) ** 2 - float(sigma) ** 2)
        x = _add_noise(x, noise_sampler(sigma, sigma_hat), _f32(scale))
    return x, sigma_hat


# --- samplers ------------------------------------------------------------------------------------------------


def euler(denoise: Denoiser, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
          noise_sampler: NoiseSampler | None = None, key=None, callback: StepCallback | None = None):
    """Euler steps (Karras et al. 2022, Algorithm 2); one denoiser call per step. With ``s_churn`` > 0 the noise
    level is first raised by up to a factor sqrt(2) where ``s_tmin <= sigma <= s_tmax`` (needs noise)."""
    sigmas = scheduler.check_sigmas(sigmas)
    steps = len(sigmas) - 1
    noise = _noise_sampler(noise_sampler, key, x, "euler with s_churn") if s_churn > 0 else None
    for i in range(steps):
        gamma = _churn(s_churn, s_tmin, s_tmax, float(sigmas[i]), steps)
        x, sigma_hat = _churned_sigma(x, sigmas[i], gamma, s_noise, noise)
        x = _euler_update(x, denoise(x, sigma_hat), sigma_hat, sigmas[i + 1])
        x = _after_step(callback, i, sigmas[i], x)
    return x


def heun(denoise: Denoiser, x, sigmas, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
         noise_sampler: NoiseSampler | None = None, key=None, callback: StepCallback | None = None):
    """Heun steps (Karras et al. 2022, Algorithm 2): two denoiser calls per step, one on the last (to sigma 0)."""
    sigmas = scheduler.check_sigmas(sigmas)
    steps = len(sigmas) - 1
    noise = _noise_sampler(noise_sampler, key, x, "heun with s_churn") if s_churn > 0 else None
    for i in range(steps):
        gamma = _churn(s_churn, s_tmin, s_tmax, float(sigmas[i]), steps)
        x, sigma_hat = _churned_sigma(x, sigmas[i], gamma, s_noise, noise)
        sigma_next = sigmas[i + 1]
        dt = _f32(sigma_next - sigma_hat)
        x_pred, derivative = _heun_predict(x, denoise(x, sigma_hat), sigma_hat, dt)
        if sigma_next == 0:
            x = x_pred
        else:
            x = _heun_correct(x, derivative, x_pred, denoise(x_pred, sigma_next), sigma_next, dt)
        x = _after_step(callback, i, sigmas[i], x)
    return x


def euler_ancestral(denoise: Denoiser, x, sigmas, *, eta=1.0, s_noise=1.0, noise_sampler: NoiseSampler | None = None,
                    key=None, callback: StepCallback | None = None):
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise up to sigma_next; one call per step."""
    sigmas = scheduler.check_sigmas(sigmas)
    noise = _noise_sampler(noise_sampler, key, x, "euler_ancestral") if eta else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _euler_update(x, denoise(x, sigma), sigma, _f32(sigma_down))
        if sigma_next > 0 and sigma_up > 0:
            x = _add_noise(x, noise(sigma, sigma_next), _f32(s_noise * sigma_up))
        x = _after_step(callback, i, sigma, x)
    return x


def dpmpp_2s_ancestral(denoise: Denoiser, x, sigmas, *, eta=1.0, s_noise=1.0,
                       noise_sampler: NoiseSampler | None = None, key=None, callback: StepCallback | None = None):
    """Ancestral DPM-Solver++(2S): a second-order single-step update (a midpoint evaluation in log sigma) down to
    sigma_down, then fresh noise; two denoiser calls per step (one where sigma_down is 0)."""
    sigmas = scheduler.check_sigmas(sigmas)
    noise = _noise_sampler(noise_sampler, key, x, "dpmpp_2s_ancestral") if eta else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = _euler_update(x, denoised, sigma, _f32(0.0))
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            sigma_mid = math.exp(-(t + h / 2))
            x_mid = _combine(x, _f32(sigma_mid / sigma), denoised, _f32(-math.expm1(-h / 2)))
            denoised_mid = denoise(x_mid, _f32(sigma_mid))
            x = _combine(x, _f32(sigma_down / sigma), denoised_mid, _f32(-math.expm1(-h)))
        if sigma_next > 0 and sigma_up > 0:
            x = _add_noise(x, noise(sigma, sigma_next), _f32(s_noise * sigma_up))
        x = _after_step(callback, i, sigma, x)
    return x


def dpmpp_2m(denoise: Denoiser, x, sigmas, *, key=None, callback: StepCallback | None = None):
    """DPM-Solver++(2M): second-order multistep on the previous step's denoised; one denoiser call per step.
    Deterministic (``key`` is accepted, as by every sampler, and unused)."""
    sigmas = scheduler.check_sigmas(sigmas)
    previous = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigmas[i])
        x_scale = sigma_next / sigma
        if sigma_next == 0:  # the exponential integrator's last step lands on the denoised estimate
            x = _combine(x, _f32(0.0), denoised, _f32(1.0))
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if previous is None:
                x = _combine(x, _f32(x_scale), denoised, _f32(-math.expm1(-h)))
            else:
                r = (math.log(float(sigmas[i - 1])) - math.log(sigma)) / h
                blended = _combine(denoised, _f32(1 + 1 / (2 * r)), previous, _f32(-1 / (2 * r)))
                x = _combine(x, _f32(x_scale), blended, _f32(-math.expm1(-h)))
        previous = denoised
        x = _after_step(callback, i, sigmas[i], x)
    return x


def lms(denoise: Denoiser, x, sigmas, *, order=4, key=None, callback: StepCallback | None = None):
    """Linear multistep on the last ``order`` derivatives; one denoiser call per step. Deterministic (``key`` is
    unused)."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    sigmas = scheduler.check_sigmas(sigmas)
    derivatives: list = []
    for i in range(len(sigmas) - 1):
        derivatives = [_derivative(x, denoise(x, sigmas[i]), sigmas[i]), *derivatives][:order]
        coefficients = lms_coefficients(sigmas, i, len(derivatives))
        x = _multistep(x, tuple(derivatives), tuple(_f32(c) for c in coefficients))
        x = _after_step(callback, i, sigmas[i], x)
    return x


def lcm(denoise: Denoiser, x, sigmas, *, s_noise=1.0, noise_sampler: NoiseSampler | None = None, key=None,
        callback: StepCallback | None = None):
    """Multistep consistency sampling (LCM; AnimateLCM-SVD's scheduler): each step takes the denoiser's estimate
    and, unless the next sigma is 0, noises it afresh to the next sigma; one denoiser call per step. For
    consistency-distilled UNets, on their own few-step schedule (``scheduler.sigmas_for("animatelcm", n)``)."""
    sigmas = scheduler.check_sigmas(sigmas)
    noise = _noise_sampler(noise_sampler, key, x, "lcm") if len(sigmas) > 2 else None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = denoise(x, sigma)
        if sigma_next > 0:
            x = _add_noise(x, noise(sigma, sigma_next), _f32(s_noise * float(sigma_next)))
        x = _after_step(callback, i, sigma, x)
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": euler,
    "heun": heun,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "lms": lms,
    "lcm": lcm,
}
# Denoiser calls per step (the last step of heun and dpmpp_2s_ancestral, to sigma 0, makes one).
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "euler_ancestral": 1, "dpmpp_2s_ancestral": 2, "dpmpp_2m": 1, "lms": 1,
                        "lcm": 1}


def evaluations(sampler: str, num_steps: int) -> int:
    """Denoiser calls a sampler makes over ``num_steps`` steps (without churn changes: churn adds none)."""
    per_step = EVALUATIONS_PER_STEP[check_sampler(sampler)]
    return num_steps if per_step == 1 else per_step * num_steps - 1


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return name


def sample(name: str, denoise: Denoiser, x, sigmas, **options):
    """Run the sampler called ``name`` (a key of :data:`SAMPLERS`) with its keyword ``options``."""
    return SAMPLERS[check_sampler(name)](denoise, x, sigmas, **options)
