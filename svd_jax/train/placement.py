"""Where training arrays live on a ``("data",)`` mesh (:func:`svd_jax.sharding.make_mesh`).

Data parallel: every batch array is split along its first (clip) axis. FSDP (``shard_params``): every large
parameter, its gradient and its optimizer moments are split along their largest axis divisible by the number of
devices (the rule of :func:`svd_jax.sharding.param_sharder`, which depends only on the shape), so each device
holds 1/N of the trainable state and XLA gathers a layer's weights when it is used. Without ``shard_params``
they are replicated. Scalars (the step, the optimizer's counters) and the RNG key are replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from svd_jax import sharding


def tree_shardings(tree, mesh: Mesh, shard_params: bool):
    """A sharding for every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s)."""
    by_shape = sharding.param_sharder(mesh, shard_params)
    return jax.tree.map(lambda a: by_shape("", tuple(a.shape)) if len(a.shape) else sharding.replicated(mesh), tree)


def place_tree(tree, mesh: Mesh | None, shard_params: bool):
    """``tree`` on the mesh, or committed to the first device without one (so that the jitted step sees the same
    placement before and after its first call, and compiles once)."""
    if mesh is None:
        return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return jax.device_put(tree, tree_shardings(tree, mesh, shard_params))


def check_batch_size(batch_size: int, mesh: Mesh | None) -> None:
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of devices ({mesh.size}) "
                         "for data-parallel training")


def place_batch(tree, mesh: Mesh | None):
    """Split every array of a batch along its first axis across the mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda a: jax.device_put(a, sharding.rows(mesh, a.shape[0], a.ndim)), tree)
