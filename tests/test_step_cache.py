"""Step caching (DeepCache-style): the UNet's shallow branch with reused deep features, counted evaluations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svd_jax.configs import UNetConfig
from svd_jax.loader import random_models


@pytest.fixture(scope="module")
def unet_and_inputs():
    config = UNetConfig.tiny()
    unet = random_models({"unet": config}).unet
    rng = np.random.default_rng(0)
    b, f, h, w = 2, 3, 4, 6
    inputs = (jnp.asarray(rng.standard_normal((b, f, h, w, config.in_channels)), jnp.float32),
              jnp.asarray([0.3, -0.5], jnp.float32),
              jnp.asarray(rng.standard_normal((b, 1, config.cross_attention_dim[0])), jnp.float32),
              jnp.asarray(rng.standard_normal((b, 3)), jnp.float32))
    return unet, inputs


def test_shallow_branch_with_its_own_deep_features_is_the_full_unet(unet_and_inputs):
    unet, inputs = unet_and_inputs
    graph, state = nnx.split(unet)

    @jax.jit
    def full(state, *inputs):
        return nnx.merge(graph, state).call_with_deep_features(*inputs)

    @jax.jit
    def shallow(state, deep, *inputs):
        return nnx.merge(graph, state).call_with_deep_features(*inputs, deep_features=deep)[0]

    full = full.lower(state, *inputs).compile()
    out, deep = full(state, *inputs)
    shallow = shallow.lower(state, deep, *inputs).compile()
    np.testing.assert_array_equal(shallow(state, deep, *inputs), out)
    # the deep features matter: other features give another output
    assert np.abs(np.asarray(shallow(state, deep * 0.5, *inputs) - out)).max() > 1e-3
    assert 0 < shallow.cost_analysis()["flops"] < 0.8 * full.cost_analysis()["flops"]
