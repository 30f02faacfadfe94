"""Bidirectional (keyframe) sampling: mechanics on a fixed function, then the pipeline on the tiny converted model
against a PyTorch implementation of ViBiDSampler's published loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svd_jax import keyframes, scheduler

SHAPE = (2, 5, 3, 4, 4)  # [B, F, h, w, C]


def pair_denoiser(shift):
    """A fixed stand-in for the UNet over [uncond, cond] rows: frame-mixing, sigma-dependent, and conditioned
    (``shift`` plays the keyframe's conditioning, the cond half differs from the uncond half)."""
    def denoise(rows, sigma):
        uncond, cond = jnp.split(rows, 2)
        base = rows / (1 + sigma ** 2) + 0.05 * jnp.roll(rows, 1, axis=1) * jnp.arange(1, SHAPE[1] + 1)[:, None,
                                                                                                        None, None]
        u, c = jnp.split(base, 2)
        return jnp.concatenate([u, c + shift * sigma / (1 + sigma)])

    return denoise


def draws(seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((16, *SHAPE)).astype(np.float32)
    return lambda step, pass_index: jnp.asarray(table[step])


SIGMAS = scheduler.karras_sigmas(4, sigma_max=20.0)
START = jnp.asarray(np.random.default_rng(5).standard_normal((SHAPE[0], *SHAPE[2:])), jnp.float32)
END = jnp.asarray(np.random.default_rng(6).standard_normal((SHAPE[0], *SHAPE[2:])), jnp.float32)
SCALES = jnp.full((SHAPE[1],), 1.5, jnp.float32)


def run(x, start_first=True, swap=False, **kw):
    start, end = pair_denoiser(0.3), pair_denoiser(-0.7)
    start_latent, end_latent = START, END
    if swap:
        start, end, start_latent, end_latent = end, start, end_latent, start_latent
    return keyframes.bidirectional_sample(start, end, x, SIGMAS, start_latent, end_latent, SCALES,
                                          kw.pop("noise", draws(7)), start_first=start_first, **kw)


def test_each_pass_pins_its_keyframe_and_the_last_step_lands_on_them():
    x = jax.random.normal(jax.random.key(0), SHAPE) * SIGMAS[0]
    passes, trajectory = [], []
    out = run(x, on_pass=lambda i, d, pinned: passes.append((i, d, np.asarray(pinned))),
              callback=lambda i, s, latents: trajectory.append(np.asarray(latents)))
    assert [(i, d) for i, d, _ in passes] == [(i, d) for i in range(4) for d in ("forward", "backward")]
    for i, direction, pinned in passes:  # the forward pass pins its last frame to the end keyframe, and the
        expected = END if direction == "forward" else START  # backward pass (frames flipped) to the start one
        np.testing.assert_array_equal(pinned[:, -1], np.asarray(expected))
    assert len(trajectory) == 4
    # at sigma 0 the sample is the backward pass's pinned estimate, flipped back: its first frame the start latent
    np.testing.assert_array_equal(np.asarray(out)[:, 0], np.asarray(START))
    np.testing.assert_array_equal(np.asarray(out), passes[-1][2][:, ::-1])


def test_swapping_start_and_end_samples_the_time_reversed_video():
    x = jax.random.normal(jax.random.key(1), SHAPE) * SIGMAS[0]
    table = np.random.default_rng(8).standard_normal((16, *SHAPE)).astype(np.float32)
    forward = run(x, noise=lambda i, k: jnp.asarray(table[i]))
    reversed_ = run(jnp.flip(x, 1), start_first=False, swap=True, noise=lambda i, k: jnp.asarray(table[i][:, ::-1]))
    np.testing.assert_array_equal(np.asarray(reversed_)[:, ::-1], np.asarray(forward))
    # and the order of the passes matters (so the check above is not vacuous)
    assert not np.array_equal(np.asarray(run(x, noise=lambda i, k: jnp.asarray(table[i]), start_first=False)),
                              np.asarray(forward))


def test_cfg_pp_takes_the_direction_from_the_unconditional_estimate():
    x = jax.random.normal(jax.random.key(2), SHAPE) * SIGMAS[0]
    both = pair_denoiser(0.3)(jnp.concatenate([x, x]), SIGMAS[0])
    uncond, cond = np.split(np.asarray(both), 2)
    guided = uncond + 1.5 * (cond - uncond)
    for cfg_pp, direction in ((True, uncond), (False, guided)):
        stepped, pinned = keyframes._pass_update(x, both, SCALES, END, SIGMAS[0], SIGMAS[1], cfg_pp)
        expected_pinned = guided.copy()
        expected_pinned[:, -1] = np.asarray(END)
        np.testing.assert_allclose(np.asarray(pinned), expected_pinned, rtol=1e-6, atol=1e-6)
        expected = expected_pinned + (np.asarray(x) - direction) / SIGMAS[0] * SIGMAS[1]
        np.testing.assert_allclose(np.asarray(stepped), expected, rtol=1e-5, atol=1e-5)


def test_paired_needs_the_unconditional_rows():
    cond = keyframes.Conditioning(jnp.zeros((1, 1, 4)), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 3)), None)
    with pytest.raises(ValueError, match="unconditional"):
        keyframes.paired(cond, 1.0, 3)
    guided = cond._replace(image_embeds=jnp.zeros((2, 1, 4)), image_latents=jnp.zeros((2, 2, 2, 4)),
                           added_time_ids=jnp.zeros((2, 3)), guidance_scales=jnp.ones(3))
    unguided, scales = keyframes.paired(guided, 0.8, 3)
    assert unguided.guidance_scales is None and unguided.num_videos == 2
    np.testing.assert_array_equal(np.asarray(scales), np.full(3, 0.8, np.float32))
    with pytest.raises(ValueError, match="finite"):
        keyframes.paired(guided, math.nan, 3)


# --- the pipeline on the tiny converted model, against ViBiDSampler's loop written in PyTorch -------------------

torch = pytest.importorskip("torch")
from tiny_svd import random_image as images, tiny_reference_and_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_reference_and_pipeline(tmp_path_factory.mktemp("keyframes"))


def vibid_reference(unet, x, sigmas, start, end, start_latent, end_latent, scale, renoise):
    """ViBiDSampler's published sampling loop (s_churn 0) for one video, in PyTorch, frames-first [F, C, h, w]:
    the v-prediction EDM denoiser on [uncond, cond], CFG at a constant scale, the keyframe projection solved by
    conjugate gradients on the masked last frame (as the authors' DDS step), the CFG++ update, re-noising, flip."""
    frames = x.shape[0]

    def denoise(x, sigma, cond):
        embeds, image_latents, time_ids = cond
        rows = torch.cat([x, x])[None].reshape(2, frames, *x.shape[1:])
        c_in, c_out = 1 / (sigma ** 2 + 1) ** 0.5, -sigma / (sigma ** 2 + 1) ** 0.5
        sample = torch.cat([rows * c_in, image_latents[:, None].expand(-1, frames, -1, -1, -1)], dim=2)
        out = unet(sample, torch.full((2,), 0.25 * math.log(sigma)), embeds, time_ids).sample
        denoised = out * c_out + rows / (sigma ** 2 + 1)
        return denoised[0], denoised[1]

    def project(x, latent):  # min ||A z - b|| from z = x, A the mask of the last frame: CG as the authors run it
        mask = torch.zeros_like(x)
        mask[-1] = 1
        b = torch.zeros_like(x)
        b[-1] = latent
        r = b * mask - (x * mask) * mask
        p, rs = r.clone(), (r * r).sum()
        for _ in range(5):
            ap = p * mask * mask
            a = rs / (p * ap).sum()
            x, r = x + a * p, r - a * ap
            rs_new = (r * r).sum()
            if rs_new.sqrt() < 1e-5:
                break
            p, rs = r + rs_new / rs * p, rs_new
        return x

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        for k, (cond, latent) in enumerate(((start, end_latent), (end, start_latent))):
            if k == 1:
                x = torch.flip(x + renoise[i] * (sigma ** 2 - sigma_next ** 2) ** 0.5, dims=[0])
            x_u, x_c = denoise(x, sigma, cond)
            x = project(x_u + scale * (x_c - x_u), latent) + (x - x_u) / sigma * sigma_next
            if k == 1:
                x = torch.flip(x, dims=[0])
    return x


def to_torch(a, channels_last_dims=None):
    array = np.asarray(a)
    if channels_last_dims == 5:  # [B, F, h, w, C] -> [B, F, C, h, w]
        array = array.transpose(0, 1, 4, 2, 3)
    elif channels_last_dims == 4:  # [B, h, w, C] -> [B, C, h, w]
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.array(array, copy=True))


def test_keyframe_pipeline_matches_vibidsampler_in_pytorch(tiny, monkeypatch):
    torch_unet, pipe = tiny
    size = dict(height=32, width=40)
    common = dict(num_frames=3, min_guidance_scale=1.0, max_guidance_scale=2.0, seed=11, **size)
    start = pipe.encode_conditioning(images(1), **common)
    end = pipe.encode_conditioning(images(2), **common)
    start_latent, end_latent = pipe.encode_latents(images(1), **size), pipe.encode_latents(images(2), **size)
    noise = np.random.default_rng(3).standard_normal((1, 3, 16, 20, 4)).astype(np.float32)
    sigmas = scheduler.karras_sigmas(3)
    renoise = np.random.default_rng(4).standard_normal((3, 1, 3, 16, 20, 4)).astype(np.float32)
    # the re-noising noise the reference uses, in place of the draws from the seed
    monkeypatch.setattr(keyframes, "seeded_noise_sampler", lambda seeds, shape: lambda i, k: jnp.asarray(renoise[i]))
    ours = pipe.sample_keyframes(start, end, start_latent, end_latent, guidance_scale=1.3, sigmas=sigmas,
                                 latents=noise, progress=False)

    def cond(c):
        return (to_torch(c.image_embeds), to_torch(c.image_latents, 4), to_torch(c.added_time_ids))

    x = to_torch(noise, 5)[0] * float(np.sqrt(np.float32(sigmas[0]) ** 2 + 1))
    with torch.no_grad():
        expected = vibid_reference(torch_unet, x, sigmas, cond(start), cond(end), to_torch(start_latent, 4)[0],
                                   to_torch(end_latent, 4)[0], 1.3, to_torch(renoise[:, 0], 5))
    expected = expected.permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(ours)[0] - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_generate_with_last_image_and_loop(tiny, monkeypatch):
    _, pipe = tiny
    from svd_jax import denoiser as denoiser_module

    calls = []
    original = denoiser_module.Denoiser.__call__
    monkeypatch.setattr(denoiser_module.Denoiser, "__call__", lambda self, x, s: calls.append(x.shape) or original(
        self, x, s))
    args = dict(height=32, width=40, num_frames=3, num_inference_steps=2, seed=5, output_type="latent",
                progress=False)
    trajectory = []
    both = pipe([images(1), images(2)], last_image=[images(2), images(1)],
                callback_on_step_end=lambda i, s, x: trajectory.append(np.asarray(x)), **args)
    assert len(calls) == 2 * 2 and all(shape[0] == 2 * 2 for shape in calls)  # 2 passes x 2 steps, [u, c] rows
    assert len(trajectory) == 2
    starts = np.asarray(pipe.encode_latents([images(1), images(2)], height=32, width=40))
    np.testing.assert_array_equal(np.asarray(both)[:, 0], starts)  # the last step lands on the start keyframes
    alone = pipe(images(2), last_image=images(1), **{**args, "seed": 6})
    # a video in a batch equals the video alone, up to float32 rounding of the sigma-700 sample, which the first
    # step carries into the result (the UNet's sums round differently at another batch size)
    assert np.abs(np.asarray(alone)[0] - np.asarray(both)[1]).max() <= 4 * np.spacing(np.float32(700))
    looped = pipe(images(1), loop=True, **args)
    np.testing.assert_array_equal(np.asarray(looped), np.asarray(pipe(images(1), last_image=images(1), **args)))
    with pytest.raises(ValueError, match="not both"):
        pipe(images(1), last_image=images(2), loop=True, **args)
    with pytest.raises(ValueError, match="last images"):
        pipe(images(1), last_image=[images(2), images(1)], **args)
