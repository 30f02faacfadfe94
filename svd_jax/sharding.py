"""Meshes and partition rules for running on several devices.

One mesh axis, ``"data"``, over all local devices (or, after ``jax.distributed.initialize()``, over every
device of every host). Generation splits the rows of the UNet batch, which are the videos times the two
classifier-free-guidance halves, across the devices; parameters are replicated by default, or sharded along
their largest divisible axis (FSDP-style) for devices too small to hold a full copy.

Multi-host: call ``jax.distributed.initialize()`` on every host first (on TPU pods and SLURM/Kubernetes GPU
clusters it needs no arguments), then ``make_mesh()`` spans all hosts' devices and every host runs the same
``generate`` call with the same arguments.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Parameters smaller than this stay replicated even when sharding parameters: splitting them saves nothing.
MIN_SHARDED_PARAM_SIZE = 2 ** 18


def make_mesh(devices=None) -> Mesh:
    """A 1-D ``("data",)`` mesh over ``devices`` (default: all devices, of every host after distributed init)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.array(devices), (DATA_AXIS,))


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)`` for tracing a program that runs on ``mesh`` (nothing when ``mesh`` is None)."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def rows(mesh: Mesh, num_rows: int, ndim: int) -> NamedSharding:
    """Split axis 0 across the mesh when it divides evenly, else replicate (a correct fallback, never an error)."""
    if num_rows % mesh.size:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def param_sharder(mesh: Mesh, shard_params: bool = False, min_size: int = MIN_SHARDED_PARAM_SIZE):
    """``sharding(path, shape)`` for :func:`svd_jax.load`: replicated parameters, or with ``shard_params`` each
    parameter of at least ``min_size`` elements split along its largest axis divisible by the number of devices."""

    def sharding(path: str, shape: tuple[int, ...]) -> NamedSharding:
        if not shard_params or int(np.prod(shape)) < min_size:
            return replicated(mesh)
        axes = sorted(range(len(shape)), key=lambda a: -shape[a])
        axis = next((a for a in axes if shape[a] % mesh.size == 0), None)
        if axis is None:
            return replicated(mesh)
        spec = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return NamedSharding(mesh, PartitionSpec(*spec))

    return sharding


def place_rows(array, mesh: Mesh | None, like=None):
    """``array`` with its axis 0 split across ``mesh`` (see :func:`rows`). Without a mesh, committed to the device
    of ``like`` (an array the same program's inputs or outputs live on) when given, else as it is: a jitted
    step's outputs are committed, so a first input that is not would compile the step a second time."""
    if mesh is not None:
        return jax.device_put(array, rows(mesh, array.shape[0], array.ndim))
    return array if like is None else jax.device_put(array, like.sharding)


def on_mesh(array, mesh: Mesh) -> bool:
    return isinstance(getattr(array, "sharding", None), NamedSharding) and array.sharding.mesh == mesh


class Replicas:
    """Replicated copies on a mesh of one module's weights that live elsewhere (weights already on the mesh,
    e.g. sharded at load time, are used as they are). ``replicas(state)`` returns the state with every array on
    the mesh. A copy is reused while its source array is still the module's; a source replaced since the last
    call (``nnx.update``) is placed anew and its old copy dropped."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.copies: dict[int, tuple[jax.Array, jax.Array]] = {}  # id(source) -> (source, copy)

    def __call__(self, state):
        leaves, treedef = jax.tree.flatten(state)
        kept, placed = {}, []
        for leaf in leaves:
            if on_mesh(leaf, self.mesh):
                placed.append(leaf)
                continue
            entry = self.copies.get(id(leaf))
            if entry is None or entry[0] is not leaf:
                entry = (leaf, jax.device_put(leaf, replicated(self.mesh)))
            kept[id(leaf)] = entry
            placed.append(entry[1])
        self.copies = kept
        return jax.tree.unflatten(treedef, placed)
