"""Small contracts: a temporal convolution checks its input's channels; the learning-rate schedule's values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svd_jax.layers import temporal_conv
from svd_jax.policy import Policy
from svd_jax.train.config import OptimizerConfig
from svd_jax.train.step import learning_rate


def test_temporal_conv_refuses_another_channel_count():
    conv = temporal_conv(4, 6, Policy.float32(), nnx.Rngs(0))
    assert conv(jnp.zeros((1, 3, 2, 2, 4))).shape == (1, 3, 2, 2, 6)
    # 8 channels would reshape the [3, 1, 1, 4, 6] kernel to [3, 1, 8, 3] and run with the wrong weights
    with pytest.raises(ValueError, match="expects 4 channels"):
        conv(jnp.zeros((1, 3, 2, 2, 8)))


@pytest.mark.parametrize("warmup, decay", [(0, 0), (1, 0), (4, 0), (0, 5), (4, 5)])
def test_learning_rate_warms_up_then_decays(warmup, decay):
    peak = 2e-5
    schedule = learning_rate(OptimizerConfig(learning_rate=peak, warmup_steps=warmup, decay_steps=decay))
    for step in range(warmup + decay + 3):
        expected = peak * (min(1.0, (step + 1) / warmup) if warmup else 1.0)
        if decay:
            expected *= 0.5 * (1 + math.cos(math.pi * min(max(step - warmup, 0), decay) / decay))
        assert float(schedule(np.int32(step))) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_presets_are_typed_and_spread_as_generate_arguments():
    import dataclasses
    import inspect

    import svd_jax

    preset = svd_jax.PRESETS["svd_xt"]
    assert isinstance(preset, svd_jax.pipeline.Preset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.fps = 8
    assert dict(**preset) == dict(num_frames=25, num_inference_steps=30, min_guidance_scale=1.5,
                                  max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02,
                                  decode_chunk_size=14)
    assert "num_frames" not in svd_jax.PRESETS["diffusers"]  # unset: the UNet's own count
    accepted = inspect.signature(svd_jax.generate).parameters
    for name, p in svd_jax.PRESETS.items():
        assert set(p) <= set(accepted), name
