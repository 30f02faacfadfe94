"""Where training arrays live on a ``("data",)`` mesh (:func:`svd_jax.sharding.make_mesh`).

Data parallel: every batch array is split along its first (clip) axis. FSDP (``shard_params``): every parameter
of at least ``min_size`` elements, its gradient and its optimizer moments are split along their largest axis
divisible by the number of devices (the rule of :func:`svd_jax.sharding.param_sharder`, which depends only on
the shape), so each device holds about 1/N of the trainable state and XLA gathers a layer's weights where it is
used. Without ``shard_params`` they are replicated. Scalars (the step, optimizer counters) and the RNG key are
replicated.

Several processes (one per host or per GPU, the mesh over all of their devices): each process reads only the
rows of a batch that its own devices hold (:func:`local_rows`) and :func:`place_batch` assembles the global
batch from every process's part, so no host loads another's clips.
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
    return jax.tree.map(_put, tree, tree_shardings(tree, layout if shard else layout._replace(shard_params=False)))


def _put(array, target):
    """``array`` (the same on every process) placed with ``target``; over several processes each places its own
    devices' parts of a local array (no transfer between hosts)."""
    if target.is_fully_addressable or (isinstance(array, jax.Array) and not array.is_fully_addressable):
        return jax.device_put(array, target)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def gather_tree(tree):
    """``tree`` with every array whole on this process: arrays split across processes are gathered (a
    collective: every process calls it with the same tree), replicated ones give their local copy, others stay."""
    from jax.experimental import multihost_utils

    def whole(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return a
        if a.is_fully_replicated:
            return a.addressable_data(0)
        return multihost_utils.process_allgather(a, tiled=True)

    return jax.tree.map(whole, tree)


def check_batch_size(batch_size: int, layout: Layout) -> None:
    if layout.mesh is not None and batch_size % layout.mesh.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of devices "
                         f"({layout.mesh.size}) for data-parallel training")


def local_rows(batch_size: int, layout: Layout) -> range:
    """The rows of a global batch of ``batch_size`` that this process's devices hold: all of them in one process,
    a contiguous block of them per process on a mesh over several (the rows each process reads from disk)."""
    if layout.mesh is None:
        return range(batch_size)
    blocks = {index[0].indices(batch_size)[:2] for index in
              sharding.rows(layout.mesh, batch_size, 1).addressable_devices_indices_map((batch_size,)).values()}
    start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
    if sum(b - a for a, b in blocks) != stop - start:
        raise ValueError("this process's devices are not neighbours on the mesh's data axis (build the mesh with "
                         "svd_jax.sharding.make_mesh(), which orders the devices by process)")
    return range(start, stop)


def place_batch(tree, layout: Layout, batch_size: int):
    """One global batch of ``batch_size`` rows from every process's :func:`local_rows` of it (host arrays),
    split along the first axis across the mesh; as it is without a mesh."""
    if layout.mesh is None:
        return tree
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        sharding.rows(layout.mesh, batch_size, a.ndim), a, (batch_size, *a.shape[1:])), tree)
