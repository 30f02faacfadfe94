"""One training step as one jitted function: conditioning, loss, gradients, clipping and the AdamW update.

The trainable parameters are float32 master weights with float32 AdamW moments; the UNet computes in its
policy's compute dtype (bfloat16 on accelerators: ``nnx.Linear``/``nnx.Conv`` cast the float32 weights when they
are used), with norms, softmax, the EDM scalings and the loss in float32. Frozen parameters get no gradient and
no optimizer state. Randomness comes from the state's key, split once per step, so a run is a deterministic
function of the seed, the data and the step count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from svd_jax import sharding
from svd_jax.lora import fresh_dropout_keys
from svd_jax.train.conditioning import ClipFeatures, training_batch
from svd_jax.train.config import ObjectiveConfig, OptimizerConfig
from svd_jax.train.objective import diffusion_loss, draw_diffusion_noise
from svd_jax.train.params import SplitModel
from svd_jax.train.placement import Layout, tree_shardings


# The LoRA adapters' dropout keys come from the step's key folded with this (the batch and noise keys are
# unchanged by it, so runs without dropout draw what they drew before).
DROPOUT_STREAM = 1


class TrainState(NamedTuple):
    """Everything a step changes (the data position is kept by the loop, next to it)."""

    step: jax.Array  # int32 scalar: completed steps
    params: dict  # trainable parameters, float32, by dotted path
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data of the training RNG


def learning_rate(config: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate`` over ``warmup_steps`` (step 0 already gets lr / warmup), then constant,
    or with ``decay_steps`` a cosine decay to 0 over that many steps."""
    peak, warmup, decay = config.learning_rate, config.warmup_steps, config.decay_steps
    after = optax.cosine_decay_schedule(peak, decay) if decay else optax.constant_schedule(peak)
    if not warmup:
        return after
    # (count + 1) / warmup of the peak: the first step already trains, the warmup-th reaches the peak
    warm = optax.linear_schedule(peak / warmup, peak, max(warmup - 1, 0))
    return optax.join_schedules([warm, after], [warmup])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the warm-up schedule."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_grad_norm),
        optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay))


def init_state(params: dict, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                      jax.random.key_data(jax.random.key(seed)))


class StepSetup(NamedTuple):
    """The static part of a step (hashable: equal setups share one compiled step, across trainers too)."""

    unet: SplitModel
    vae_graph: nnx.GraphDef
    objective: ObjectiveConfig
    optimizer: OptimizerConfig
    layout: Layout = Layout()


def _inputs(setup: StepSetup, key, vae_params, features: ClipFeatures):
    batch_key, noise_key = jax.random.split(key)
    batch = training_batch(nnx.merge(setup.vae_graph, vae_params), features, batch_key, setup.objective)
    return batch, draw_diffusion_noise(noise_key, batch.latents.shape, setup.objective)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _train_step(setup: StepSetup, state: TrainState, frozen: dict, vae_params, features: ClipFeatures):
    rng, key = jax.random.split(jax.random.wrap_key_data(state.rng))
    batch, noise = _inputs(setup, key, vae_params, features)

    frozen = fresh_dropout_keys(frozen, jax.random.fold_in(key, DROPOUT_STREAM))

    def loss_fn(params):
        return diffusion_loss(setup.unet.merge(params, frozen), batch, noise)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(setup.optimizer).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(state.step + 1, params, opt_state, jax.random.key_data(rng))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": learning_rate(setup.optimizer)(state.step)}
    if setup.layout.mesh is not None:  # keep the state's layout from step to step
        new = jax.lax.with_sharding_constraint(new, tree_shardings(new, setup.layout))
        metrics = jax.lax.with_sharding_constraint(metrics, sharding.replicated(setup.layout.mesh))
    return new, metrics


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(setup: StepSetup, params, frozen, vae_params, features, key):
    batch, noise = _inputs(setup, key, vae_params, features)
    frozen = fresh_dropout_keys(frozen, jax.random.fold_in(key, DROPOUT_STREAM))
    return diffusion_loss(setup.unet.merge(params, frozen), batch, noise)[0]


class TrainStep:
    """``step(state, frozen, vae_params, features) -> (state, metrics)``, jitted once per setup and input shape.

    ``frozen`` is the UNet's frozen flat dict, ``vae_params`` the VAE's state (for the conditioning latents),
    ``features`` a :class:`ClipFeatures` batch. ``metrics``: ``loss``, ``grad_norm`` (before clipping),
    ``learning_rate``. The input state is donated. On a mesh the new state keeps the layout of
    :func:`svd_jax.train.placement.tree_shardings`; the batch is split across the devices by its placement.
    """

    def __init__(self, unet: SplitModel, vae, objective: ObjectiveConfig, optimizer_config: OptimizerConfig,
                 layout: Layout = Layout()):
        self.setup = StepSetup(unet, nnx.split(vae)[0], objective, optimizer_config, layout)
        self.optimizer = make_optimizer(optimizer_config)

    def __call__(self, state: TrainState, frozen: dict, vae_params, features: ClipFeatures):
        return _train_step(self.setup, state, frozen, vae_params, features)

    def lower(self, state: TrainState, frozen: dict, vae_params, features: ClipFeatures):
        """The step lowered for these arguments (arrays or ``jax.ShapeDtypeStruct``s with shardings): compiled,
        not run, it gives XLA's memory and cost analyses (:mod:`svd_jax.train.plan`)."""
        return _train_step.lower(self.setup, state, frozen, vae_params, features)

    def evaluate(self, params: dict, frozen: dict, vae_params, features: ClipFeatures, key) -> jax.Array:
        """The loss (no update) for a fixed ``key``: the same latents, augmentation and noise for every call, so
        losses of different parameters are comparable."""
        return _evaluate(self.setup, params, frozen, vae_params, features, key)
