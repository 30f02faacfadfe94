"""From canonical PyTorch names to the NNX parameter tree, by the type of the target module.

Because the NNX modules mirror the PyTorch attribute paths, the PyTorch name of a parameter follows from its
NNX path and the type of the module that owns it: an ``nnx.Linear`` at ``a.b`` owns ``a.b.kernel``, filled from
``a.b.weight`` transposed. Parameters held directly by other modules (``class_embedding``, ``mix_factor``)
keep their names. Source keys that are deliberately not used are listed in :data:`IGNORED_SOURCE_KEYS`.

Strictness: every source key is consumed or ignored by name, every target parameter is filled exactly once, and
shapes must be equal after the transform. Anything else is a :class:`ConversionError` naming the keys.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flax import nnx

from convert.errors import ConversionError
from svd_jax.bounded_io import DeferredArray
from svd_jax.checkpoint import param_shapes, path_key
from svd_jax.layers import GroupNorm, LayerNorm

Transform = Callable[[np.ndarray], np.ndarray]


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """``nn.Linear.weight [out, in]`` -> ``kernel [in, out]``."""
    if w.ndim != 2:
        raise ValueError(f"a Linear weight must be 2-D, got shape {w.shape}")
    return w.T


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """``nn.ConvNd.weight [O, I, *K]`` -> ``kernel [*K, I, O]`` (OIHW -> HWIO, OIDHW -> DHWIO)."""
    if w.ndim < 3:
        raise ValueError(f"a convolution weight must be at least 3-D, got shape {w.shape}")
    return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


_LINEAR = {"kernel": ("weight", linear_kernel), "bias": ("bias", None)}
_CONV = {"kernel": ("weight", conv_kernel), "bias": ("bias", None)}
_NORM = {"scale": ("weight", None), "bias": ("bias", None)}
_EMBED = {"embedding": ("weight", None)}

# Rules keyed by the target module type: NNX leaf name -> (PyTorch parameter name, transform).
RULES: dict[type, dict[str, tuple[str, Transform | None]]] = {
    nnx.Linear: _LINEAR,
    nnx.Conv: _CONV,
    GroupNorm: _NORM,
    LayerNorm: _NORM,
    nnx.LayerNorm: _NORM,
    nnx.Embed: _EMBED,
}

# Source keys that carry no parameter of ours (buffers upstream registers as persistent).
IGNORED_SOURCE_KEYS = [re.compile(r"(.*\.)?position_ids$")]


@dataclass(frozen=True)
class Target:
    """Where one canonical PyTorch key goes: the NNX parameter path, its shape, and the transform to apply."""

    param: str
    shape: tuple[int, ...]
    transform: Transform | None


def _module_types(model) -> dict[str, type]:
    return {path_key(path): type(node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}


def expected_keys(model) -> dict[str, Target]:
    """``{canonical PyTorch key: Target}`` for every parameter of ``model`` (abstract or concrete)."""
    modules = _module_types(model)
    expected: dict[str, Target] = {}
    for param, struct in param_shapes(model).items():
        owner, _, leaf = param.rpartition(".")
        rule = next((r for t, r in RULES.items() if issubclass(modules.get(owner, object), t)), None)
        torch_name, transform = rule[leaf] if rule and leaf in rule else (leaf, None)
        key = f"{owner}.{torch_name}" if owner else torch_name
        if key in expected:
            raise AssertionError(f"two parameters map to the source key {key!r}")
        expected[key] = Target(param, tuple(struct.shape), transform)
    return expected


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def plan(component: str, expected: dict[str, Target], source_keys: dict[str, tuple[int, ...]]) -> list[str]:
    """Check key coverage and shapes before reading any tensor. ``source_keys`` maps canonical keys to the
    shape they will have *before* the target transform. Returns the ignored keys; raises on any mismatch."""
    ignored = sorted(k for k in source_keys if k not in expected and any(p.fullmatch(k) for p in IGNORED_SOURCE_KEYS))
    unexpected = sorted(k for k in source_keys if k not in expected and k not in ignored)
    missing = sorted(k for k in expected if k not in source_keys)
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_summarise(unexpected)}")
        raise ConversionError(f"{component}: the checkpoint does not fit the {component} architecture; "
                              + "; ".join(parts) + " (wrong model, or pass --config for a non-standard size)")
    for key, target in expected.items():
        shape = source_keys[key]
        out_shape = transformed_shape(target.transform, shape)
        if out_shape != target.shape:
            raise ConversionError(f"{component}: key {key!r} has shape {list(shape)}, the {component} config needs "
                                  f"{list(_untransformed_shape(target, shape))} (pass --config for a non-standard size)")
    return ignored


def transformed_shape(transform: Transform | None, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``transform`` gives an array of ``shape``, computed on a zero-size view (None if it refuses)."""
    if transform is None:
        return tuple(shape)
    try:
        return tuple(transform(np.broadcast_to(np.zeros((), np.uint8), shape)).shape)
    except ValueError:
        return None


def _untransformed_shape(target: Target, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The source shape that would have fitted, for error messages."""
    if target.transform is linear_kernel:
        return tuple(reversed(target.shape))
    if target.transform is conv_kernel:
        *k, i, o = target.shape
        return (o, i, *k)
    return target.shape


def fill(expected: dict[str, Target], read: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Read each canonical key once, transform it, and return ``{NNX parameter path: array}``."""
    params = {}
    for key, target in expected.items():
        array = read(key)
        if target.transform is not None:
            array = target.transform(array)
        params[target.param] = np.ascontiguousarray(array)
    return params


def _read_transformed(read: Callable[[str], np.ndarray], key: str, transform: Transform | None) -> np.ndarray:
    array = read(key)
    return np.ascontiguousarray(array if transform is None else transform(array))


def deferred(expected: dict[str, Target], dtype: Callable[[str], np.dtype],
             read: Callable[[str], np.ndarray]) -> dict[str, DeferredArray]:
    """:func:`fill` without reading: ``{NNX parameter path: DeferredArray}``, each canonical key read and transformed
    when the array is written (``dtype(key)``: its dtype, which the transforms keep)."""
    return {target.param: DeferredArray(target.shape, np.dtype(dtype(key)),
                                        functools.partial(_read_transformed, read, key, target.transform))
            for key, target in expected.items()}
