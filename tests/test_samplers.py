"""Samplers and schedules against k-diffusion (fp32, CPU): the same denoiser on both sides (a small fixed function
written in torch and in JAX, and the tiny UNet through the real converter), the same sigmas and injected noise."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import svd_jax
from animatelcm_reference import AnimateLCMReferenceScheduler
from parity import convert_inprocess, load_k_diffusion_sampling, max_rel_err
from svd_jax import samplers, scheduler
from tiny_svd import tiny_pipeline

K = load_k_diffusion_sampling()
SHAPE = (2, 3, 4, 6, 4)  # [B, F, h, w, C]

# name, options, k-diffusion function; churn options exercise the s_tmin/s_tmax window (sigmas 20 .. 0.02)
CASES = [
    ("euler", {}, K.sample_euler),
    ("euler", dict(s_churn=2.0, s_tmin=0.05, s_tmax=5.0, s_noise=1.1), K.sample_euler),
    ("heun", {}, K.sample_heun),
    ("heun", dict(s_churn=1.5, s_tmin=0.1, s_noise=0.9), K.sample_heun),
    ("euler_ancestral", {}, K.sample_euler_ancestral),
    ("euler_ancestral", dict(eta=0.6, s_noise=1.2), K.sample_euler_ancestral),
    ("dpmpp_2s_ancestral", {}, K.sample_dpmpp_2s_ancestral),
    ("dpmpp_2s_ancestral", dict(eta=0.5), K.sample_dpmpp_2s_ancestral),
    ("dpmpp_2m", {}, K.sample_dpmpp_2m),
    ("lms", {}, K.sample_lms),
    ("lms", dict(order=2), K.sample_lms),
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in opts.items()) or 'default'}" for name, opts, _ in CASES]


def fixed_denoiser_jax(x, sigma):
    sigma = jnp.float32(sigma)
    return x / (1 + sigma * sigma) + jnp.sin(1.7 * x) * sigma / (1 + sigma) - 0.05 * jnp.roll(x, 1, axis=-1)


def fixed_denoiser_torch(x, sigma):
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + sigma * sigma) + torch.sin(1.7 * x) * sigma / (1 + sigma) - 0.05 * torch.roll(x, 1, dims=-1)


class InjectedNoise:
    """The same noise draws on both sides: ancestral draws in call order; churn draws by step (k-diffusion draws
    one with torch.randn_like every step, svd_jax only where it churns, so they are matched by the step's sigma)."""

    def __init__(self, sigmas, seed=3):
        self.sigmas = np.asarray(sigmas, np.float32)
        self.draws = np.random.default_rng(seed).standard_normal((2 * len(sigmas), *SHAPE)).astype(np.float32)
        self.torch_calls = self.jax_calls = 0

    def torch_sampler(self, sigma, sigma_next):
        self.torch_calls += 1
        return torch.from_numpy(self.draws[self.torch_calls - 1])

    def jax_sampler(self, sigma, sigma_next):
        self.jax_calls += 1
        return jnp.asarray(self.draws[self.jax_calls - 1])

    def torch_randn_like(self, x):
        self.torch_calls += 1
        return torch.from_numpy(self.draws[self.torch_calls - 1])

    def jax_churn_sampler(self, sigma, sigma_hat):
        (step,) = np.flatnonzero(self.sigmas == np.float32(sigma))
        return jnp.asarray(self.draws[step])


def run_both(name, options, k_sample, denoise_jax, denoise_torch, sigmas, x0, monkeypatch):
    noise = InjectedNoise(sigmas)
    k_options, options = dict(options), dict(options)
    if name in ("euler", "heun"):
        monkeypatch.setattr(torch, "randn_like", noise.torch_randn_like)
        if options.get("s_churn", 0) > 0:
            options["noise_sampler"] = noise.jax_churn_sampler
    elif "ancestral" in name:
        k_options["noise_sampler"] = noise.torch_sampler
        options["noise_sampler"] = noise.jax_sampler
    with torch.no_grad():
        expected = k_sample(denoise_torch, torch.from_numpy(x0), torch.from_numpy(np.asarray(sigmas, np.float32)),
                            disable=True, **k_options).numpy()
    actual = samplers.sample(name, denoise_jax, jnp.asarray(x0), sigmas, **options)
    return np.asarray(actual), expected


@pytest.mark.parametrize("name,options,k_sample", CASES, ids=IDS)
def test_samplers_match_k_diffusion_on_a_fixed_denoiser(name, options, k_sample, monkeypatch):
    sigmas = scheduler.karras_sigmas(7, 0.02, 20.0)
    x0 = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32) * sigmas[0]
    actual, expected = run_both(name, options, k_sample, fixed_denoiser_jax, fixed_denoiser_torch, sigmas, x0,
                                monkeypatch)
    assert np.isfinite(expected).all()
    assert max_rel_err(actual, expected) <= 1e-5


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """The tiny diffusers UNet and its conversion, random conditioning, and the converted one as an EDM
    v-prediction denoiser: ``denoise_jax(x, sigma)`` (counting its calls) and the same function for torch."""
    root = tmp_path_factory.mktemp("samplers")
    torch_unet = tiny_pipeline().unet
    torch_unet.save_pretrained(root / "src" / "unet")
    convert_inprocess(root / "src", root / "dst", "--no-hash")
    unet = svd_jax.load(root / "dst", policy=svd_jax.Policy.float32()).unet
    rng = np.random.default_rng(4)
    b, f, h, w, _ = SHAPE
    image_latents = rng.standard_normal((b, 1, h, w, 4)).astype(np.float32)
    context = rng.standard_normal((b, 1, 32)).astype(np.float32)
    ids = np.asarray([[6.0, 127.0, 0.02]] * b, np.float32)

    @jax.jit
    def denoise(x, sigma, c_noise):
        unet_in = jnp.concatenate([scheduler.scale_model_input(x, sigma), jnp.broadcast_to(image_latents, x.shape)],
                                  axis=-1)
        out = unet(unet_in, jnp.full((b,), c_noise), context, ids)
        return scheduler.denoised(x, out, sigma)

    calls = []

    def denoise_jax(x, sigma):
        calls.append(float(sigma))
        return denoise(x, np.float32(sigma), np.float32(0.25 * math.log(float(sigma))))

    def denoise_torch(x, sigma):
        return torch.from_numpy(np.array(denoise_jax(jnp.asarray(x.numpy()), sigma[0].item())))

    conditioning = dict(image_latents=image_latents, context=context, ids=ids)
    return SimpleNamespace(denoise_jax=denoise_jax, denoise_torch=denoise_torch, calls=calls, compiled=denoise,
                           torch_unet=torch_unet, **conditioning)


@pytest.mark.parametrize("name,options,k_sample", [c for c in CASES if not c[1]],
                         ids=[i for i, c in zip(IDS, CASES) if not c[1]])
def test_samplers_match_k_diffusion_on_the_tiny_unet(tiny_unet, name, options, k_sample, monkeypatch):
    sigmas = scheduler.karras_sigmas(4, 0.02, 30.0)
    x0 = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32) * sigmas[0]
    tiny_unet.calls.clear()
    actual, expected = run_both(name, options, k_sample, tiny_unet.denoise_jax, tiny_unet.denoise_torch, sigmas, x0,
                                monkeypatch)
    assert max_rel_err(actual, expected) <= 1e-5
    # both sides call the same denoiser: k-diffusion's run, then svd_jax's, each as often as evaluations() says
    assert len(tiny_unet.calls) == 2 * samplers.evaluations(name, 4)
    # at the same sigmas: k-diffusion computes DPM-Solver's midpoints in float32 (up to 7e-6 apart), svd_jax in float64
    half = len(tiny_unet.calls) // 2
    np.testing.assert_allclose(tiny_unet.calls[half:], tiny_unet.calls[:half], rtol=1e-5)
    assert tiny_unet.compiled._cache_size() == 1  # every sampler, every sigma: one compiled UNet evaluation


@pytest.mark.parametrize("steps", [1, 4, 6])
def test_lcm_matches_the_animatelcm_reference_on_the_tiny_unet(tiny_unet, steps):
    """AnimateLCM's loop in torch (its scheduler's scaling, timesteps and step on the diffusers UNet) against
    svd_jax's lcm sampler on its animatelcm schedule over the converted UNet, with the same injected noise."""
    b, f, h, w, c = SHAPE
    rng = np.random.default_rng(steps)
    noises = rng.standard_normal((steps, *SHAPE)).astype(np.float32)
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 2)))  # noqa: E731  [B,F,C,h,w]
    reference = AnimateLCMReferenceScheduler(noises=[to_torch(n) for n in noises])
    reference.set_timesteps(steps)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    x = to_torch(x0) * reference.init_noise_sigma
    image_latents = to_torch(np.broadcast_to(tiny_unet.image_latents, SHAPE).copy())
    with torch.no_grad():
        for t in reference.timesteps:
            model_in = torch.cat([reference.scale_model_input(x, t), image_latents], dim=2)
            out = tiny_unet.torch_unet(model_in, t, encoder_hidden_states=torch.from_numpy(tiny_unet.context),
                                       added_time_ids=torch.from_numpy(tiny_unet.ids), return_dict=False)[0]
            x = reference.step(out, t, x).prev_sample
    expected = x.permute(0, 1, 3, 4, 2).numpy()

    sigmas = scheduler.sigmas_for("animatelcm", steps)
    np.testing.assert_allclose(sigmas, reference.sigmas.numpy(), rtol=1e-6, atol=0)
    calls = iter(noises)
    actual = samplers.lcm(tiny_unet.denoise_jax, jnp.asarray(x0) * np.float32(reference.init_noise_sigma), sigmas,
                          noise_sampler=lambda sigma, sigma_next: jnp.asarray(next(calls)))
    assert max_rel_err(actual, expected) <= 1e-5


def test_default_noise_from_a_key_and_step_callback():
    sigmas = scheduler.karras_sigmas(4, 0.02, 20.0)
    x0 = jnp.ones(SHAPE) * sigmas[0]
    first = samplers.euler_ancestral(fixed_denoiser_jax, x0, sigmas, key=jax.random.key(7))
    again = samplers.euler_ancestral(fixed_denoiser_jax, x0, sigmas, key=jax.random.key(7))
    other = samplers.euler_ancestral(fixed_denoiser_jax, x0, sigmas, key=jax.random.key(8))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3
    with pytest.raises(ValueError, match="key="):
        samplers.dpmpp_2s_ancestral(fixed_denoiser_jax, x0, sigmas)

    seen = []

    def zero_after_step_1(i, sigma, x):
        seen.append((i, sigma))
        return jnp.zeros_like(x) if i == 1 else None

    out = samplers.dpmpp_2m(fixed_denoiser_jax, x0, sigmas, callback=zero_after_step_1)
    assert seen == [(i, float(sigmas[i])) for i in range(4)]
    from_zero = samplers.dpmpp_2m(fixed_denoiser_jax, jnp.zeros(SHAPE), sigmas[2:])
    assert np.isfinite(np.asarray(out)).all() and np.asarray(out).shape == SHAPE
    # after the replaced step the history (the previous denoised) still comes from step 1, so only shape matters
    assert np.asarray(from_zero).shape == SHAPE
    with pytest.raises(ValueError, match="unknown sampler"):
        samplers.sample("ddim", fixed_denoiser_jax, x0, sigmas)


# --- schedules ------------------------------------------------------------------------------------------------


def assert_rel(actual, expected, tol=1e-6):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=0)


@pytest.fixture
def float64_torch():
    """k-diffusion builds schedules in torch's default dtype; float32 rounding alone puts its Karras 0.002 at
    1.7e-6 relative. Its rule evaluated in float64 is the reference the float32 schedules are held to."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("n", [1, 5, 25])
def test_schedules_match_k_diffusion(n, float64_torch):
    assert_rel(scheduler.sigmas_for("karras", n), K.get_sigmas_karras(n, 0.002, 700.0, 7.0))
    assert_rel(scheduler.sigmas_for("karras", n, 0.03, 80.0, rho=5.0), K.get_sigmas_karras(n, 0.03, 80.0, 5.0))
    assert_rel(scheduler.sigmas_for("exponential", n), K.get_sigmas_exponential(n, 0.002, 700.0))
    assert_rel(scheduler.sigmas_for("polyexponential", n), K.get_sigmas_polyexponential(n, 0.002, 700.0))
    assert_rel(scheduler.sigmas_for("polyexponential", n, 0.1, 50.0, rho=2.5),
               K.get_sigmas_polyexponential(n, 0.1, 50.0, 2.5))


def ays_rule(num_steps):
    """Align Your Steps: the published SVD levels, log-linearly interpolated to num_steps + 1 points, last 0."""
    levels = [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]
    xs = np.linspace(0, 1, len(levels))
    new = np.exp(np.interp(np.linspace(0, 1, num_steps + 1), xs, np.log(levels[::-1])))[::-1]
    return np.concatenate([new[:-1], [0.0]])


@pytest.mark.parametrize("n", [1, 4, 10, 14, 25, 30])
def test_ays_schedule(n):
    sigmas = scheduler.sigmas_for("ays", n)
    assert sigmas.dtype == np.float32 and sigmas.shape == (n + 1,) and sigmas[-1] == 0
    assert_rel(sigmas, ays_rule(n))
    assert sigmas[0] == np.float32(700.0)
    if n == 10:
        np.testing.assert_array_equal(sigmas[:-1], np.float32(scheduler.AYS_SVD_SIGMAS[:-1]))
    sched = scheduler.schedule(num_steps=n, kind="ays")
    np.testing.assert_array_equal(sched.sigmas, sigmas)
    assert sched.init_noise_sigma == scheduler.schedule(num_steps=n).init_noise_sigma
    with pytest.raises(ValueError, match="unknown schedule"):
        scheduler.schedule(num_steps=n, kind="cosine")


# --- in the pipeline ------------------------------------------------------------------------------------------


def test_generate_with_a_sampler_and_schedule():
    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    pipe = svd_jax.Pipeline(models)
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    args = dict(num_frames=2, height=32, width=32, progress=False, output_type="latent", num_inference_steps=3)
    latents = np.random.default_rng(5).standard_normal((1, 2, 16, 16, 4)).astype(np.float32)
    steps = []
    out = pipe(image, sampler="heun", schedule="ays", seed=5, latents=latents,
               callback_on_step_end=lambda i, sigma, x: steps.append(sigma), **args)
    cond = pipe.encode_conditioning(image, num_frames=2, height=32, width=32, seed=5)
    sigmas = scheduler.sigmas_for("ays", 3)
    init = np.float32(scheduler.schedule(num_steps=3, kind="ays").init_noise_sigma)
    np.testing.assert_array_equal(out, samplers.heun(pipe.denoiser(cond), jnp.asarray(latents) * init, sigmas))
    assert steps == [float(s) for s in sigmas[:-1]]
    ancestral = dict(args, sampler="dpmpp_2s_ancestral", sampler_options=dict(eta=0.8))
    first, again, other = (pipe(image, seed=seed, **ancestral) for seed in (5, 5, 6))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first - other)).max() > 1e-3
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe(image, sampler="ddim", **args)
    with pytest.raises(ValueError, match="unknown schedule"):
        pipe(image, schedule="cosine", **args)


def test_noise_per_row_follows_its_key():
    """With one key per video (as the pipeline passes), a video's noise does not depend on its batch."""
    keys = [jax.random.key(5), jax.random.key(9)]
    pair = samplers.KeyNoiseSampler(keys, (2, 3, 4))
    alone = samplers.KeyNoiseSampler(keys[1:], (1, 3, 4))
    for _ in range(2):
        both, single = pair(1.0, 0.5), alone(1.0, 0.5)
        np.testing.assert_array_equal(both[1], single[0])
        assert np.abs(np.asarray(both[0] - both[1])).max() > 0.1
