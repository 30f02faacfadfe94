"""Windowed long-video sampling: window placement, fusion weights, the windowed denoiser, FreeNoise noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svd_jax import long_video


@pytest.mark.parametrize("frames,window,stride", [(3, 3, 2), (14, 5, 2), (25, 14, 7), (26, 14, 12), (40, 25, 1),
                                                  (7, 4, 4)])
def test_windows_cover_every_frame_and_weights_sum_to_one(frames, window, stride):
    starts = long_video.window_starts(frames, window, stride)
    assert starts[0] == 0 and starts[-1] + window == max(frames, window) and list(starts) == sorted(set(starts))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))
    weights = long_video.fusion_weights(frames, window, starts)
    assert weights.shape == (len(starts), min(window, frames)) and weights.dtype == np.float32
    assert (weights > 0).all()
    total = np.zeros(frames)
    for w, start in enumerate(starts):
        total[start:start + weights.shape[1]] += weights[w]
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_a_stride_longer_than_the_window_is_refused():
    with pytest.raises(ValueError, match="stride"):
        long_video.window_starts(30, 10, 11)


def frame_denoiser(x, sigma):
    """Depends on each frame's neighbours inside its window (as a video UNet does) and on sigma."""
    return x / (1 + sigma ** 2) + 0.1 * jnp.roll(x, 1, axis=1) + jnp.sin(x) * 0.01


def test_one_window_over_all_frames_is_the_plain_denoiser():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4, 4))
    windowed = long_video.WindowedDenoiser(frame_denoiser, num_frames=5, window=5, stride=3)
    assert windowed.starts == (0,)
    np.testing.assert_array_equal(np.asarray(windowed(x, 2.0)), np.asarray(frame_denoiser(x, 2.0)))


def test_windowed_denoiser_fuses_each_windows_estimate():
    x = jax.random.normal(jax.random.key(1), (2, 9, 2, 2, 4))
    windowed = long_video.WindowedDenoiser(frame_denoiser, num_frames=9, window=4, stride=2)
    out = np.asarray(windowed(x, 0.5))
    expected = np.zeros_like(out)
    for w, start in enumerate(windowed.starts):  # each window on its own, as one video
        window_out = np.asarray(frame_denoiser(x[:, start:start + 4], 0.5))
        expected[:, start:start + 4] += np.asarray(windowed.weights[w])[None, :, None, None, None] * window_out
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert windowed.evaluations == 1


def test_freenoise_reuses_the_first_windows_noise_shuffled():
    noise = jax.random.normal(jax.random.key(2), (4, 2, 2, 1))
    extended = np.asarray(long_video.freenoise(noise, 11, jax.random.key(3)))
    assert extended.shape == (11, 2, 2, 1)
    np.testing.assert_array_equal(extended[:4], np.asarray(noise))
    base = {np.asarray(noise)[i].tobytes() for i in range(4)}
    assert all(extended[i].tobytes() in base for i in range(4, 11))
    assert len({extended[i].tobytes() for i in range(4, 8)}) == 4  # a permutation, not repeats
    np.testing.assert_array_equal(np.asarray(long_video.freenoise(noise, 4, jax.random.key(3))), np.asarray(noise))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_svd import tiny_reference_and_pipeline

    return tiny_reference_and_pipeline(tmp_path_factory.mktemp("long_video"))[1]


def test_pipeline_windows(tiny):
    from tiny_svd import random_image

    args = dict(height=32, width=40, num_inference_steps=2, output_type="latent", progress=False)
    # one window over all the frames is today's sampler, bit for bit
    plain = tiny(random_image(1), num_frames=3, seed=4, **args)
    one_window = tiny(random_image(1), num_frames=3, window_size=3, seed=4, **args)
    np.testing.assert_array_equal(np.asarray(one_window), np.asarray(plain))
    # a long video: 7 frames in windows of 3 every 2 frames (3 windows), one UNet call of all windows per step
    calls = []
    long = tiny([random_image(1), random_image(2)], num_frames=7, window_size=3, window_stride=2, seed=[4, 8],
                callback_on_step_end=lambda i, s, x: calls.append(x.shape), **args)
    assert long.shape == (2, 7, 16, 20, 4) and calls == [(2, 7, 16, 20, 4)] * 2
    alone = tiny(random_image(2), num_frames=7, window_size=3, window_stride=2, seed=8, **args)
    # a video in a batch equals the video alone, up to float32 rounding of the sigma-700 sample, which the first
    # step carries into the result (the UNet's sums round differently at another batch size)
    assert np.abs(np.asarray(alone)[0] - np.asarray(long)[1]).max() <= 4 * np.spacing(np.float32(700))


def test_extend(tiny, tmp_path):
    import svd_jax
    from svd_jax import video

    clip = (np.random.default_rng(0).random((2, 32, 40, 3)) * 255).astype(np.uint8)
    same = svd_jax.extend(clip, tiny, 0)
    np.testing.assert_array_equal(same, clip.astype(np.float32) / 255)  # extending by 0 frames is the identity
    longer = svd_jax.extend(clip, tiny, 5, overlap=1, seed=3, num_inference_steps=1, progress=False)
    assert longer.shape == (7, 32, 40, 3) and np.isfinite(longer).all()
    np.testing.assert_array_equal(longer[0], same[0])  # frames before the blended overlap are kept
    with pytest.raises(ValueError, match="overlap"):
        svd_jax.extend(clip, tiny, 2, overlap=4)
    path = video.save_video(longer, tmp_path / "v.gif")
    assert video.read_video(path).shape == (7, 32, 40, 3)
