"""Where training arrays live on a ``("data",)`` mesh (:func:`svd_jax.sharding.make_mesh`).

Data parallel: every batch array is split along its first (clip) axis. FSDP (``shard_params``): every parameter
of at least ``min_size`` elements, its gradient and its optimizer moments are split along their largest axis
divisible by the number of devices (the rule of :func:`svd_jax.sharding.param_sharder`, which depends only on
the shape), so each device holds about 1/N of the trainable state and XLA gathers a layer's weights where it is
used. Without ``shard_params`` they are replicated. Scalars (the step, optimizer counters) and the RNG key are
replicated.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.sharding import Mesh

from svd_jax import sharding


class Layout(NamedTuple):
    """How a run is spread over devices (hashable: part of the jitted step's static setup)."""

    mesh: Mesh | None = None
    shard_params: bool = False
    min_size: int = sharding.MIN_SHARDED_PARAM_SIZE

    def param_sharder(self):
        """``sharding(path, shape)`` for :func:`svd_jax.load`, or None without a mesh."""
        if self.mesh is None:
            return None
        return sharding.param_sharder(self.mesh, self.shard_params, self.min_size)


def tree_shardings(tree, layout: Layout):
    """A sharding for every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s) on ``layout.mesh``."""
    by_shape = layout.param_sharder()
    return jax.tree.map(lambda a: by_shape("", tuple(a.shape)) if len(a.shape) else sharding.replicated(layout.mesh),
                        tree)


def place_tree(tree, layout: Layout, shard: bool = True):
    """``tree`` on the mesh (``shard=False``: replicated), or committed to the first device without a mesh, so the
    jitted step sees the same placement before and after its first call and compiles once."""
    if layout.mesh is None:
        return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    return jax.device_put(tree, tree_shardings(tree, layout if shard else layout._replace(shard_params=False)))


def check_batch_size(batch_size: int, layout: Layout) -> None:
    if layout.mesh is not None and batch_size % layout.mesh.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of devices "
                         f"({layout.mesh.size}) for data-parallel training")


def place_batch(tree, layout: Layout):
    """Split every array of a batch along its first axis across the mesh."""
    if layout.mesh is None:
        return tree
    return jax.tree.map(lambda a: jax.device_put(a, sharding.rows(layout.mesh, a.shape[0], a.ndim)), tree)
