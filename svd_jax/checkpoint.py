"""Orbax save/restore of converted weights.

Weights are stored as a nested dict keyed by the module's attribute path (``vision_model.encoder.layers.0...``),
in the dtype they had in the source checkpoint. Restoring builds the model abstractly (``nnx.eval_shape``) and
lets orbax cast each array to the policy's ``param_dtype`` and place it with the requested sharding.

Saving and restoring go through :mod:`svd_jax.bounded_io`: a component is written array by array (a
:class:`DeferredArray` is read only when its turn comes) and restored a few arrays at a time, straight into the
target dtype and placement, so neither needs a second copy of the component on the host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from svd_jax import bounded_io
from svd_jax.bounded_io import DeferredArray
from svd_jax.errors import STORAGE_STATUS, storage_error, storage_status
from svd_jax.policy import Policy

PARAMS_DIR = "params"


def path_key(path: tuple) -> str:
    """``('encoder', 'layers', 0, 'kernel')`` -> ``'encoder.layers.0.kernel'``."""
    return ".".join(str(p) for p in path)


def param_shapes(model) -> dict[str, jax.ShapeDtypeStruct]:
    """Every parameter of an (abstract or concrete) module, by dotted path."""
    _, state = nnx.split(model, nnx.Param)
    return {path_key(path): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for path, v in nnx.to_flat_state(state)}


def _largest_bytes(stored: dict[str, tuple[tuple[int, ...], str]], dtype=None) -> int:
    """The size of the largest stored array, in its stored dtype or ``dtype`` if that is wider."""
    return max((int(np.prod(shape)) * max(np.dtype(d).itemsize, np.dtype(dtype or d).itemsize)
                for shape, d in stored.values()), default=0)


def save_params(directory: Path, params: dict[str, np.ndarray | DeferredArray]) -> None:
    """Write ``{dotted.path: array}`` as an orbax checkpoint under ``directory/params``; a :class:`DeferredArray`
    is read when it is written."""
    path = Path(directory).absolute() / PARAMS_DIR
    try:
        bounded_io.save(path, unflatten_dict(params, sep="."), max((a.nbytes for a in params.values()), default=0))
    except Exception as e:  # tensorstore reports disk full or a read-only folder as a ValueError with a status
        if not STORAGE_STATUS.match(str(e)):
            raise  # not the storage layer's: e.g. a converter error raised while reading a deferred array
        raise storage_error(e, path, "write") from e


def stored_params(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{dotted.path: (shape, dtype name)}`` of a saved checkpoint, read from its metadata only."""
    path = Path(directory).absolute() / PARAMS_DIR
    try:
        meta = ocp.StandardCheckpointer().metadata(path)
    except Exception as e:  # a missing or damaged _METADATA, a deleted folder: orbax's types vary by version
        raise storage_error(e, path, "read") from e
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not hasattr(tree, "keys"):  # orbax gives None for a checkpoint whose metadata is missing or unreadable
        raise OSError(f"{path}: cannot read the checkpoint (its metadata is missing or damaged)")
    return {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in flatten_dict(dict(tree), sep=".").items()}


def load_params(folder: Path, params: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``folder/params`` (written by ``svd_jax.checkpoint.save_params``) as numpy in their stored
    dtype: all of them, or only the dotted paths ``params`` (orbax's partial restore)."""
    path = Path(folder).absolute() / PARAMS_DIR
    checkpointer = ocp.PyTreeCheckpointer()
    if params is None:
        params = list(stored_params(folder))
    structure = unflatten_dict({key: 0 for key in params}, sep=".")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
    try:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=structure, restore_args=restore_args,
                                                                          partial_restore=True))
    except Exception as e:  # a truncated or deleted data file (tensorstore's status errors)
        _raise_read_failure(e, path)
        raise
    return {key: np.asarray(v) for key, v in flatten_dict(restored, sep=".").items()}


Sharder = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def _raise_read_failure(error: Exception, path: Path) -> None:
    """Raise a failed restore's storage-layer failure as one ``OSError`` line; return for any other error (a device
    out of memory is left to :func:`svd_jax.errors.stage`)."""
    status = storage_status(error)
    if status is not None and "RESOURCE_EXHAUSTED" not in str(status):
        raise storage_error(status, path, "read") from error


def restore_model(abstract_model, directory: Path, policy: Policy, sharding: Sharder | None = None):
    """Restore ``directory/params`` into ``abstract_model`` (from ``nnx.eval_shape``), cast to the policy's
    ``param_dtype``; ``sharding(path, shape)`` places each array (default: the first local device)."""
    directory = Path(directory)
    graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
    expected = {path_key(path): v for path, v in nnx.to_flat_state(params)}
    stored = stored_params(directory)
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not match the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    for key, var in expected.items():
        if stored[key][0] != tuple(var.get_value().shape):
            raise ValueError(f"checkpoint {directory}: {key} has shape {stored[key][0]}, model needs {var.get_value().shape}")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        key: jax.ShapeDtypeStruct(var.get_value().shape, policy.param,
                                  sharding=sharding(key, var.get_value().shape) if sharding else device)
        for key, var in expected.items()
    }
    try:
        with bounded_io.reader(_largest_bytes(stored, policy.param)) as checkpointer:
            restored = flatten_dict(checkpointer.restore(directory.absolute() / PARAMS_DIR,
                                                         unflatten_dict(target, sep=".")), sep=".")
    except Exception as e:  # a truncated or deleted data file (tensorstore's status errors)
        _raise_read_failure(e, directory / PARAMS_DIR)
        raise
    for path, var in nnx.to_flat_state(params):
        var.set_value(restored[path_key(path)])
    return nnx.merge(graphdef, params, rest)
