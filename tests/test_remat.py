"""Gradient checkpointing is chosen when the UNet is built (``Policy.remat``), not by changing modules afterwards:
the same parameter paths and classes under every policy, the same gradients, and the training step's program
checkpoints its layers exactly when the config asks for it."""

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svd_jax.components import abstract_model
from svd_jax.layers import SpatioTemporalResBlock
from svd_jax.policy import CHECKPOINT_POLICIES, REMAT_POLICIES, Policy
from svd_jax.train.conditioning import ClipFeatures
from svd_jax.train.config import config_from_dict
from svd_jax.train.params import prepare_unet, training_policy
from svd_jax.train.step import TrainStep, init_state
from svd_jax.unet_blocks import TransformerSpatioTemporalModel
from train_helpers import UNET, VAE, random_model

CHECKPOINTED = (SpatioTemporalResBlock, TransformerSpatioTemporalModel)


def _unet(remat: str):
    """The one set of random weights, in a UNet built with ``remat``."""
    graphdef = nnx.graphdef(abstract_model("unet", UNET, Policy.float32(remat=remat)))
    return nnx.merge(graphdef, nnx.state(random_model("unet", UNET, seed=0)))


def test_every_policy_builds_the_same_parameters_and_classes():
    def layout(remat):
        unet = abstract_model("unet", UNET, Policy.float32(remat=remat))
        paths = [(path, v.get_value().shape) for path, v in nnx.to_flat_state(nnx.state(unet))]
        classes = [(path, type(node)) for path, node in nnx.iter_graph(unet)]
        remats = {node.remat for _, node in nnx.iter_graph(unet) if isinstance(node, CHECKPOINTED)}
        return paths, classes, remats

    plain_paths, plain_classes, _ = layout("none")
    for remat in REMAT_POLICIES:
        paths, classes, remats = layout(remat)
        assert paths == plain_paths and classes == plain_classes, remat
        assert remats == {remat}  # every resnet and transformer carries the build's choice
    # the modules' classes are the project's own (or flax's): nothing was derived from them at run time
    modules = {cls for _, cls in plain_classes if issubclass(cls, nnx.Module)}
    assert all(cls.__module__.startswith(("svd_jax.", "flax.")) for cls in modules), modules
    assert sum(cls in CHECKPOINTED for _, cls in plain_classes) == 9  # resnets down 1, mid 2, up 2; transformers 4
    with pytest.raises(ValueError, match="Policy.remat must be one of"):
        Policy(remat="everything")


def test_checkpointed_gradients_equal_the_plain_ones():
    """On the tiny UNet's mid block (two resnets around a transformer: both checkpointed layer kinds, a third of
    the UNet's compile time); the whole checkpointed UNet's gradients are compared with PyTorch's in
    tests/test_train_objective.py."""
    rng = np.random.default_rng(0)
    channels, temb_channels = UNET.block_out_channels[-1], 4 * UNET.block_out_channels[0]
    x = rng.normal(size=(3, 8, 8, channels)).astype(np.float32)  # one video of 3 frames
    temb = rng.normal(size=(3, temb_channels)).astype(np.float32)
    context = rng.normal(size=(1, 2, UNET.cross_attention_dim[0])).astype(np.float32)  # two tokens: real attention
    target = rng.normal(size=x.shape).astype(np.float32)

    def gradients(remat):
        graphdef, params, rest = nnx.split(_unet(remat).mid_block, nnx.Param, ...)

        def loss(params):
            out = nnx.merge(graphdef, params, rest)(x, 3, temb, context)
            return jnp.mean(jnp.square(out - target))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return float(value), {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}

    # "dots" differs from "block" only in what the backward pass keeps (its program: the test below)
    plain_loss, plain = gradients("none")
    loss, grads = gradients("block")
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain.keys() and len(plain) > 50
    scale = max(float(np.abs(g).max()) for g in plain.values())
    for path, g in plain.items():
        np.testing.assert_allclose(grads[path], g, rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))


def _train_step_jaxpr(tmp_path, remat):
    """The training step's jaxpr for a config with ``remat``, its UNet built as the trainer and the plan build it."""
    config = config_from_dict({"model": "tiny", "output_dir": str(tmp_path), "compute_dtype": "float32",
                               "remat": remat, "batch_size": 1,
                               "data": {"path": str(tmp_path), "num_frames": 3, "height": 32, "width": 32}})
    structure, trainable, frozen = prepare_unet(abstract_model("unet", UNET, training_policy(config)), config)
    vae = abstract_model("vae", VAE)
    step = TrainStep(structure, vae, config.objective, config.optimizer)
    state = jax.eval_shape(lambda p: init_state(p, step.optimizer, 0), trainable)
    latent = jax.ShapeDtypeStruct((1, 3, 8, 8, VAE.latent_channels), jnp.float32)
    features = ClipFeatures(latent, latent, jax.ShapeDtypeStruct((1, UNET.cross_attention_dim[0]), jnp.float32),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32))
    return jax.make_jaxpr(step)(state, frozen, nnx.state(vae), features).jaxpr


def _checkpoint_policies(jaxpr) -> list:
    """The policy of every checkpointed call in a jaxpr and the jaxprs inside it (``remat2`` in jax 0.10)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(inner, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
                    found += _checkpoint_policies(getattr(inner, "jaxpr", inner))
    return found


def test_training_step_checkpoints_exactly_when_configured(tmp_path):
    assert _checkpoint_policies(_train_step_jaxpr(tmp_path, "none")) == []
    for remat, policy in CHECKPOINT_POLICIES.items():
        assert _checkpoint_policies(_train_step_jaxpr(tmp_path, remat)) == [policy] * 9, remat
