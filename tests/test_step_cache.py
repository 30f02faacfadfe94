"""Step caching (DeepCache-style): the UNet's shallow branch with reused deep features, counted evaluations."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

import svd_jax
from svd_jax import samplers, sampling, scheduler, step_cache
from svd_jax.step_cache import CachedDenoiser

ARGS = dict(num_frames=2, height=32, width=32, seed=0, progress=False, output_type="latent")
IMAGE = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny():
    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    pipe = svd_jax.Pipeline(models)
    cond = pipe.encode_conditioning(IMAGE, num_frames=2, height=32, width=32, seed=0, max_guidance_scale=2.0)
    x = jax.random.normal(jax.random.key(1), (1, 2, 16, 16, 4)) * 700.0
    return models, pipe, cond, x


def test_shallow_branch_with_its_own_deep_features_is_the_full_unet(tiny):
    models, pipe, cond, x = tiny
    cached = CachedDenoiser(*nnx.split(models.unet), cond, 2)
    sigma = np.float32(3.5)
    full = cached(x, sigma)  # the whole UNet, keeping its deep features
    np.testing.assert_array_equal(cached(x, sigma), full)  # the shallow branch on the same input: the same output
    assert (cached.full_evaluations, cached.shallow_evaluations) == (1, 1)
    np.testing.assert_array_equal(cached(x, sigma), full)  # the third call is a full one again
    stale = cached(x * 0.5, sigma)  # the shallow branch on another input with the features of x
    assert np.abs(np.asarray(pipe.denoiser(cond)(x * 0.5, sigma) - stale)).max() > 1e-3  # the features matter
    graph, state = nnx.split(models.unet)
    deep = step_cache._full(graph, None, state, x, sigma, cond)[1]
    full_flops = step_cache._full.lower(graph, None, state, x, sigma, cond).cost_analysis()["flops"]
    shallow_flops = step_cache._shallow.lower(graph, None, state, deep, x, sigma, cond).cost_analysis()["flops"]
    assert 0 < shallow_flops < 0.8 * full_flops


def test_interval_one_is_the_plain_denoiser_bit_for_bit(tiny):
    models, pipe, cond, x = tiny
    sigmas = scheduler.sigmas_for("karras", 3)
    plain = samplers.heun(pipe.denoiser(cond), x, sigmas)
    cached = CachedDenoiser(*nnx.split(models.unet), cond, 1)
    np.testing.assert_array_equal(samplers.heun(cached, x, sigmas), plain)
    assert (cached.full_evaluations, cached.shallow_evaluations) == (samplers.evaluations("heun", 3), 0)


def test_interval_n_runs_the_full_unet_every_n_evaluations(tiny):
    models, pipe, cond, x = tiny
    steps, interval = 5, 3
    sigmas = scheduler.sigmas_for("karras", steps)
    cached = CachedDenoiser(*nnx.split(models.unet), cond, interval)
    out = samplers.euler(cached, x, sigmas)
    assert (cached.full_evaluations, cached.shallow_evaluations) == (math.ceil(steps / interval), 3)
    assert np.isfinite(np.asarray(out)).all()
    assert np.abs(np.asarray(out - samplers.euler(pipe.denoiser(cond), x, sigmas))).max() > 0
    compiled = step_cache._full._cache_size(), step_cache._shallow._cache_size()
    samplers.dpmpp_2m(CachedDenoiser(*nnx.split(models.unet), cond, 2), x, scheduler.sigmas_for("ays", 6))
    assert (step_cache._full._cache_size(), step_cache._shallow._cache_size()) == compiled  # no new programs


def test_generate_with_cache_interval(tiny, monkeypatch):
    models, *_ = tiny
    made = []

    class Counted(CachedDenoiser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sampling, "CachedDenoiser", Counted)  # the pipeline samples in svd_jax.sampling
    out = svd_jax.generate(IMAGE, models, num_inference_steps=4, cache_interval=3, **ARGS)
    assert len(made) == 1 and (made[0].full_evaluations, made[0].shallow_evaluations) == (2, 2)
    assert out.shape == (1, 2, 16, 16, 4) and np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="cache_interval"):
        svd_jax.generate(IMAGE, models, num_inference_steps=4, cache_interval=0, **ARGS)
