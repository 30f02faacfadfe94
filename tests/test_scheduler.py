"""Scheduler parity against diffusers' EulerDiscreteScheduler configured as SVD's scheduler_config.json."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from svd_jax import scheduler

SVD_SCHEDULER_CONFIG = dict(
    prediction_type="v_prediction",
    timestep_type="continuous",
    use_karras_sigmas=True,
    sigma_min=0.002,
    sigma_max=700.0,
    timestep_spacing="leading",
    steps_offset=1,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    interpolation_type="linear",
)


def reference(**set_timesteps_kwargs) -> EulerDiscreteScheduler:
    ref = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    ref.set_timesteps(**set_timesteps_kwargs)
    return ref


def assert_close_scaled(actual, expected, tol):
    """max |a - e| <= tol * max(1, max |e|): absolute for O(1) values, relative for large ones."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected).max()
    assert err <= tol * max(1.0, np.abs(expected).max()), f"max abs err {err:.3g}"


@pytest.mark.parametrize("num_steps", [1, 2, 14, 25, 30])
def test_schedule_matches_diffusers(num_steps):
    ref = reference(num_inference_steps=num_steps)
    sched = scheduler.schedule(num_steps=num_steps)
    assert sched.num_steps == num_steps
    assert sched.sigmas.dtype == np.float32 and sched.timesteps.dtype == np.float32
    # Same float64 numpy arithmetic as diffusers, then float32: bit-identical.
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(scheduler.karras_sigmas(num_steps), ref.sigmas.numpy())
    # diffusers takes torch's float32 log; ours is the correctly rounded one: at most 1 ulp apart.
    np.testing.assert_array_max_ulp(sched.timesteps, ref.timesteps.numpy(), maxulp=1)
    np.testing.assert_allclose(sched.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-6)
    assert sched.init_noise_sigma == float(ref.init_noise_sigma)


def test_user_sigmas_match_diffusers():
    sigmas = [80.0, 20.5, 3.25, 0.7, 0.03, 0.0]
    ref = reference(sigmas=sigmas)
    sched = scheduler.schedule(sigmas=sigmas)
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_max_ulp(sched.timesteps, ref.timesteps.numpy(), maxulp=1)
    assert sched.init_noise_sigma == float(ref.init_noise_sigma)
    # Without the trailing zero, one is appended (diffusers would stop at the last given sigma instead).
    no_zero = scheduler.schedule(sigmas=np.asarray(sigmas[:-1], np.float64))
    np.testing.assert_array_equal(no_zero.sigmas, sched.sigmas)
    np.testing.assert_array_equal(no_zero.timesteps, sched.timesteps)


def test_euler_steps_match_diffusers():
    num_steps = 25
    ref = reference(num_inference_steps=num_steps)
    sched = scheduler.schedule(num_steps=num_steps)
    gen = torch.Generator().manual_seed(0)
    b, f, c, h, w = 2, 3, 4, 5, 6
    to_nhwc = lambda t: t.permute(0, 1, 3, 4, 2).numpy()  # [B, F, C, h, w] -> [B, F, h, w, C]
    step = jax.jit(scheduler.euler_step)
    scale_input = jax.jit(scheduler.scale_model_input)
    sample = torch.randn(b, f, c, h, w, generator=gen) * ref.init_noise_sigma
    checked = 0
    for i, t in enumerate(ref.timesteps):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        model_in = ref.scale_model_input(sample, t)
        assert_close_scaled(scale_input(to_nhwc(sample), sigma), to_nhwc(model_in), 1e-6)
        model_output = torch.randn(b, f, c, h, w, generator=gen)
        # Feed both sides the same input so each step is checked on its own.
        ours = step(to_nhwc(sample), to_nhwc(model_output), sigma, sigma_next)
        sample = ref.step(model_output, t, sample).prev_sample
        assert ours.dtype == jnp.float32
        assert_close_scaled(ours, to_nhwc(sample), 1e-6)
        checked += 1
    assert checked == num_steps


def test_euler_step_computes_in_float32():
    key_x, key_v = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (1, 2, 3, 3, 4)) * 30.0
    v = jax.random.normal(key_v, (1, 2, 3, 3, 4)).astype(jnp.bfloat16)
    out = scheduler.euler_step(x.astype(jnp.bfloat16), v, jnp.float32(30.0), jnp.float32(12.5))
    expected = scheduler.euler_step(x.astype(jnp.bfloat16).astype(jnp.float32), v.astype(jnp.float32), 30.0, 12.5)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_edm_scalings():
    sigma = np.array([700.0, 31.4, 1.0, 0.0664, 0.002], np.float32)
    s = sigma.astype(np.float64)
    np.testing.assert_allclose(scheduler.c_in(sigma), 1 / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(scheduler.c_out(sigma), -s / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(scheduler.c_skip(sigma), 1 / (s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(scheduler.c_noise(sigma), 0.25 * np.log(s), rtol=1e-6, atol=1e-7)
    x = np.linspace(-3, 3, 5, dtype=np.float32)
    v = np.linspace(2, -1, 5, dtype=np.float32)
    np.testing.assert_allclose(
        scheduler.denoised(x, v, sigma),
        (1 / (s**2 + 1)) * x + (-s / np.sqrt(s**2 + 1)) * v,
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("num_frames", [1, 2, 14, 25])
@pytest.mark.parametrize("scales", [(1.0, 3.0), (1.5, 3.0), (1.0, 2.5)])
def test_linear_guidance_matches_torch_linspace(num_frames, scales):
    ours = scheduler.guidance_scales(*scales, num_frames)
    expected = torch.linspace(*scales, num_frames).numpy()  # diffusers' pipeline and sgm's guider
    assert ours.dtype == np.float32 and ours.shape == (num_frames,)
    # torch's vectorised float32 linspace is itself up to 1 ulp off the exact values (CPU dependent).
    np.testing.assert_array_max_ulp(ours, expected, maxulp=1)
    assert ours[0] == scales[0]
    if num_frames > 1:
        assert ours[-1] == scales[1]


def triangle_transcription(min_scale, max_scale, num_frames, periods, fusing):
    """Transcribed from Stability-AI/generative-models, sgm/modules/diffusionmodules/guiders.py,
    TrianglePredictionGuider: v = linspace(0, 1, T); wave = 2 |v/p - floor(v/p + 1/2)|; fused over
    periods by max / mean / product; scale = wave (max - min) + min. Float64."""
    v = np.linspace(0.0, 1.0, num_frames)
    waves = np.stack([2 * np.abs(v / p - np.floor(v / p + 0.5)) for p in periods])
    wave = {"max": waves.max(0), "mean": waves.mean(0), "multiply": waves.prod(0)}[fusing]
    return wave * (max_scale - min_scale) + min_scale


@pytest.mark.parametrize(
    "num_frames,period,fusing",
    [(1, 1.0, "max"), (14, 1.0, "max"), (25, 1.0, "max"), (25, 0.5, "max"), (21, 0.3, "max"),
     (25, (1.0, 0.5), "max"), (25, (1.0, 0.4), "mean"), (25, (1.0, 0.4), "multiply")],
)
def test_triangle_guidance_matches_sgm_formula(num_frames, period, fusing):
    ours = scheduler.guidance_scales(1.5, 3.0, num_frames, kind="triangle", period=period, period_fusing=fusing)
    periods = [period] if isinstance(period, float) else list(period)
    expected = triangle_transcription(1.5, 3.0, num_frames, periods, fusing)
    assert ours.dtype == np.float32 and ours.shape == (num_frames,)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_triangle_guidance_shape_of_wave():
    # v = [0, .25, .5, .75, 1], period 1: wave [0, .5, 1, .5, 0].
    np.testing.assert_allclose(scheduler.guidance_scales(1.0, 3.0, 5, kind="triangle"), [1, 2, 3, 2, 1])


def test_apply_guidance_matches_pipeline_formula():
    gen = torch.Generator().manual_seed(2)
    b, f, c, h, w = 2, 5, 4, 3, 3
    uncond, cond = torch.randn(b, f, c, h, w, generator=gen), torch.randn(b, f, c, h, w, generator=gen)
    scales = torch.linspace(1.0, 3.0, f)
    # StableVideoDiffusionPipeline: guidance_scale [1, F] -> [B, F, 1, 1, 1] on [B, F, C, h, w].
    expected = uncond + scales[None, :, None, None, None] * (cond - uncond)
    to_nhwc = lambda t: t.permute(0, 1, 3, 4, 2).numpy()
    ours = scheduler.apply_guidance(to_nhwc(uncond), to_nhwc(cond), scales.numpy())
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), to_nhwc(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: scheduler.schedule(num_steps=0), "num_steps"),
        (lambda: scheduler.schedule(num_steps=2.5), "num_steps"),
        (lambda: scheduler.schedule(), "exactly one"),
        (lambda: scheduler.schedule(num_steps=3, sigmas=[1.0, 0.0]), "exactly one"),
        (lambda: scheduler.schedule(sigmas=[[1.0, 0.5]]), "1-D"),
        (lambda: scheduler.schedule(sigmas=[1.0, -0.5, 0.0]), "non-negative"),
        (lambda: scheduler.schedule(sigmas=[1.0, 2.0, 0.0]), "decreasing"),
        (lambda: scheduler.schedule(sigmas=[1.0, 1.0, 0.0]), "decreasing"),
        (lambda: scheduler.schedule(sigmas=[1.0, 0.0, 0.0]), "decreasing"),
        (lambda: scheduler.schedule(sigmas=[0.0]), "at least one"),
        (lambda: scheduler.schedule(sigmas=[]), "at least one"),
        (lambda: scheduler.schedule(sigmas=[np.nan, 0.0]), "finite"),
        (lambda: scheduler.karras_sigmas(5, sigma_min=1.0, sigma_max=0.5), "sigma_min"),
        (lambda: scheduler.guidance_scales(1.0, 3.0, 0), "num_frames"),
        (lambda: scheduler.guidance_scales(1.0, 3.0, 14, kind="cosine"), "kind"),
        (lambda: scheduler.guidance_scales(1.0, 3.0, 14, kind="triangle", period=0.0), "period"),
        (lambda: scheduler.guidance_scales(1.0, 3.0, 14, kind="triangle", period_fusing="min"), "period_fusing"),
        (lambda: scheduler.apply_guidance(np.zeros((1, 3, 2, 2, 4)), np.zeros((1, 3, 2, 2, 4)), np.ones(2)), "scales"),
        (lambda: scheduler.apply_guidance(np.zeros((3, 2, 2, 4)), np.zeros((3, 2, 2, 4)), np.ones(3)), "uncond"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
