"""Step caching (DeepCache-style, training-free): the whole UNet every ``interval`` evaluations, the shallow branch
in between.

Between two denoising steps the UNet's deep features (everything below its first level's skip connections) change
little, so :class:`CachedDenoiser` keeps those of its last full evaluation and, for the next ``interval - 1``
evaluations, runs only the shallow branch (``conv_in``, the first down block's layers, the last up block and the
output convolution; see :meth:`svd_jax.unet.UNetSpatioTemporalConditionModel.call_with_deep_features`) with them.
It is a denoiser like :class:`svd_jax.denoiser.Denoiser`, so every sampler runs with it; the full and the shallow
evaluation are each one jitted program, compiled once per graph and shape. With ``interval=1`` every evaluation is
a full one and the result equals the plain denoiser's bit for bit. Quality with trained weights is not measured
here; DeepCache reports small losses at intervals of 2 to 5.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from svd_jax import scheduler, sharding
from svd_jax.denoiser import Conditioning, guided_output


class _Branch:
    """The UNet as :func:`guided_output` calls it, through one branch of ``call_with_deep_features``: the full
    UNet (``deep_in`` None) or the shallow branch on ``deep_in``; the full pass records its deep features."""

    def __init__(self, unet, deep_in=None):
        self.unet, self.dtype, self.deep_in, self.deep_out = unet, unet.dtype, deep_in, None

    def __call__(self, *inputs):
        out, self.deep_out = self.unet.call_with_deep_features(*inputs, deep_features=self.deep_in)
        return out


def _denoised(branch: _Branch, mesh, x, sigma, cond: Conditioning):
    sigma = jnp.asarray(sigma, jnp.float32)
    out = guided_output(branch, x, sigma, scheduler.c_noise(sigma), cond, mesh)
    return scheduler.denoised(x, out, sigma)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _full(graph, mesh, state, x, sigma, cond: Conditioning):
    branch = _Branch(nnx.merge(graph, state))
    return _denoised(branch, mesh, x, sigma, cond), branch.deep_out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _shallow(graph, mesh, state, deep_features, x, sigma, cond: Conditioning):
    return _denoised(_Branch(nnx.merge(graph, state), deep_features), mesh, x, sigma, cond)


class CachedDenoiser:
    """``denoiser(x, sigma)`` as :class:`svd_jax.denoiser.Denoiser` (a scalar sigma), evaluating the whole UNet on
    calls 0, interval, 2 * interval, ... and the shallow branch with the last full call's deep features otherwise.
    ``full_evaluations`` and ``shallow_evaluations`` count the calls of each kind. One instance per video batch
    and sampling run: it holds the deep features of the last full call."""

    def __init__(self, graph, state, conditioning: Conditioning, interval: int, mesh: Mesh | None = None):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"cache_interval must be a positive integer, got {interval!r}")
        self.graph, self.state, self.conditioning, self.mesh = graph, state, conditioning, mesh
        self.interval = interval
        self.full_evaluations = self.shallow_evaluations = 0
        self._deep_features = None

    def __call__(self, x, sigma) -> jax.Array:
        with sharding.mesh_context(self.mesh):  # as Denoiser: per-device kernels see the mesh
            return self._evaluate(x, sigma)

    def _evaluate(self, x, sigma) -> jax.Array:
        calls = self.full_evaluations + self.shallow_evaluations
        if calls % self.interval == 0:
            self.full_evaluations += 1
            denoised, deep = _full(self.graph, self.mesh, self.state, x, sigma, self.conditioning)
            self._deep_features = deep if self.interval > 1 else None
            return denoised
        self.shallow_evaluations += 1
        return _shallow(self.graph, self.mesh, self.state, self._deep_features, x, sigma, self.conditioning)
