"""LoRA: low-rank adapters on the UNet's linear layers, their file, and applying them at load.

A targeted ``nnx.Linear`` (kernel ``W [in, out]``) becomes a :class:`LoRALinear` computing

    y = x W + b + scale * dropout(x) A B,   A [in, r], B [r, out], scale = alpha / r

with its kernel and bias untouched (same attribute paths, so the base weights load and checkpoint as before)
and two new parameters ``lora_a`` (A, the down-projection) and ``lora_b`` (B, the up-projection, zero at
initialisation, so a new adapter changes nothing). ``scale`` is a variable, not a constant of the program, so it
can change between calls without recompiling. Merging folds ``scale * A B`` into ``W``.

Targets are chosen by the module's dotted path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``)
with regular expressions or the named groups of :data:`TARGET_GROUPS`. Only linear layers take adapters.

The file (``lora.safetensors``) uses the key naming and layout of diffusers/PEFT UNet LoRA, so it is also the
export: ``unet.<module path>.lora_A.weight`` ``[r, in]`` (= A transposed) and ``unet.<module path>.lora_B.weight``
``[out, r]`` (= B transposed), float32, with diffusers' ``lora_adapter_metadata`` (``unet.r``,
``unet.lora_alpha``, ``unet.target_modules``, ...) in the safetensors header; svd_jax adds ``svd_jax_lora`` (the
training's LoRA settings) and ``svd_jax_base`` (the base model's manifest entry). The UNet's module paths equal
diffusers', so PEFT's ``set_peft_model_state_dict`` / diffusers' ``load_lora_adapter(..., prefix="unet")`` read
it, and files they write (with or without the ``unet.`` prefix; without metadata alpha = r, diffusers'
convention) load here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svd_jax.checkpoint import path_key
from svd_jax.store import atomic_file

# Named target groups (a regular expression each, searched in the linear layer's dotted path). The spatial
# transformer blocks are ``transformer_blocks``; the temporal ones ``temporal_transformer_blocks``.
TARGET_GROUPS = {
    "attention": r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "feed_forward": r"(^|\.)transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$",
    "temporal": r"(^|\.)temporal_transformer_blocks\.\d+\.",
}
DEFAULT_TARGETS = ("attention",)
# The parameters that train (everything else of a model with adapters stays frozen).
ADAPTER_PATTERN = r"(^|\.)lora_(a|b)$"
DROPOUT_KEY = "lora_dropout_key"
FILE_PREFIX = "unet."
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the PEFT LoraConfig in the header
SETTINGS_KEY = "svd_jax_lora"
BASE_KEY = "svd_jax_base"


class LoRAScale(nnx.Variable):
    """``alpha / rank`` (times a user's scale): state, so changing it does not recompile."""


class LoRADropoutKey(nnx.Variable):
    """Key data for the adapter's input dropout; the training step replaces it every step."""


class LoRALinear(nnx.Linear):
    """An ``nnx.Linear`` with a low-rank update; built from the layer it adapts (its kernel and bias are shared)."""

    def __init__(self, base: nnx.Linear, a, b, alpha: float, dropout: float = 0.0, scale: float = 1.0):
        for name in ("kernel", "bias", "in_features", "out_features", "use_bias", "dtype", "param_dtype",
                     "precision", "dot_general", "promote_dtype", "preferred_element_type"):
            setattr(self, name, getattr(base, name))
        self.lora_a = nnx.Param(a)
        self.lora_b = nnx.Param(b)
        self.alpha = float(alpha)
        self.lora_scale = LoRAScale(jnp.asarray(alpha / self.rank * scale, jnp.float32))
        self.dropout = float(dropout)
        self.deterministic = dropout == 0.0  # nnx's train()/eval() switch
        if dropout:
            self.lora_dropout_key = LoRADropoutKey(jnp.zeros((2,), jnp.uint32))

    @property
    def rank(self) -> int:
        return int(self.lora_a.get_value().shape[1])

    def __call__(self, inputs, out_sharding=None):
        return super().__call__(inputs, out_sharding) + self.low_rank_update(inputs)

    def low_rank_update(self, inputs):
        """``scale * dropout(x) A B`` in the compute dtype: what the adapter adds to the layer's output (also
        added by code that computes several layers' base projections in one matmul)."""
        dtype = self.dtype or inputs.dtype
        x = inputs.astype(dtype)
        if self.dropout and not self.deterministic:
            key = jax.random.wrap_key_data(self.lora_dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dtype)
        low = jnp.dot(x, self.lora_a[...].astype(dtype), precision=self.precision)
        up = jnp.dot(low, self.lora_b[...].astype(dtype), precision=self.precision)
        return (self.lora_scale[...] * up).astype(dtype)

    def merged_kernel(self):
        """``W + scale * A B``, computed in float32 and returned in the kernel's dtype."""
        return merged_kernel(self.kernel[...], self.lora_a[...], self.lora_b[...], self.lora_scale[...])


def merged_kernel(kernel, a, b, scale):
    """``kernel + scale * a @ b`` in float32, cast back to ``kernel``'s dtype (numpy or jax arrays)."""
    xp = np if isinstance(kernel, np.ndarray) else jnp
    f32 = xp.float32
    delta = xp.matmul(xp.asarray(a, f32), xp.asarray(b, f32)) * xp.asarray(scale, f32)
    return (xp.asarray(kernel, f32) + delta).astype(kernel.dtype)


def target_patterns(targets: Sequence[str]) -> tuple[str, ...]:
    """Group names replaced by their expressions; anything else must be a valid regular expression."""
    if isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of group names {sorted(TARGET_GROUPS)} or "
                         f"regular expressions, got {targets!r}")
    patterns = []
    for t in targets:
        if t in TARGET_GROUPS:
            patterns.append(TARGET_GROUPS[t])
            continue
        try:
            re.compile(t)
        except re.error as e:
            raise ValueError(f"LoRA target {t!r} is neither a group {sorted(TARGET_GROUPS)} nor a valid regular "
                             f"expression: {e}") from None
        patterns.append(t)
    return tuple(patterns)


def linear_layers(model) -> dict[str, nnx.Linear]:
    """Every ``nnx.Linear`` of ``model`` (adapted ones included), by dotted module path."""
    return {path_key(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)}


def adapted_layers(model) -> dict[str, LoRALinear]:
    return {k: v for k, v in linear_layers(model).items() if isinstance(v, LoRALinear)}


def _replace(model, path: str, new) -> None:
    *parents, name = path.split(".")
    parent = model
    for part in parents:
        parent = parent[int(part)] if isinstance(parent, nnx.List) else getattr(parent, part)
    if isinstance(parent, nnx.List):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def add_adapters(model, rank: int, alpha: float, dropout: float = 0.0, targets: Sequence[str] = DEFAULT_TARGETS,
                 seed: int = 0) -> list[str]:
    """Give every linear layer of ``model`` whose path matches ``targets`` a new rank-``rank`` float32 adapter
    (A uniform in +-1/sqrt(in), PEFT's default; B zero), in place; returns the adapted paths. Works on abstract
    models inside ``nnx.eval_shape`` too."""
    patterns = [re.compile(p) for p in target_patterns(targets)]
    chosen = sorted(p for p, layer in linear_layers(model).items()
                    if not isinstance(layer, LoRALinear) and any(r.search(p) for r in patterns))
    if not chosen:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}")
    key = jax.random.key(seed)
    layers = linear_layers(model)
    for i, path in enumerate(chosen):
        base = layers[path]
        bound = base.in_features ** -0.5
        a = jax.random.uniform(jax.random.fold_in(key, i), (base.in_features, rank), jnp.float32, -bound, bound)
        _replace(model, path, LoRALinear(base, a, jnp.zeros((rank, base.out_features), jnp.float32), alpha, dropout))
    return chosen


def merge_adapters(model) -> int:
    """Fold every adapter into its kernel (``W + scale * A B``) and restore plain ``nnx.Linear`` layers, in place;
    returns how many were merged. The kernel keeps its dtype and placement."""
    layers = adapted_layers(model)
    for path, layer in layers.items():
        merged = layer.merged_kernel()
        sharding = getattr(layer.kernel.get_value(), "sharding", None)
        plain = nnx.eval_shape(lambda: nnx.Linear(  # abstract: its kernel and bias are set below
            layer.in_features, layer.out_features, use_bias=layer.use_bias, dtype=layer.dtype,
            param_dtype=layer.param_dtype, precision=layer.precision, dot_general=layer.dot_general,
            promote_dtype=layer.promote_dtype, preferred_element_type=layer.preferred_element_type,
            rngs=nnx.Rngs(0)))
        plain.bias = layer.bias
        plain.kernel = nnx.Param(jax.device_put(merged, sharding) if sharding is not None else merged)
        _replace(model, path, plain)
    return len(layers)


def set_scale(model, scale: float) -> None:
    """Scale every (unmerged) adapter of ``model`` by ``scale`` relative to its ``alpha / rank``."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("set_scale: the model has no unmerged LoRA adapters (load with merge_lora=False)")
    for layer in layers.values():
        layer.lora_scale.set_value(jnp.asarray(layer.alpha / layer.rank * scale, jnp.float32))


def fresh_dropout_keys(flat: dict, key) -> dict:
    """``flat`` (``{dotted.path: array}``) with every adapter dropout key replaced by one drawn from ``key``; the
    same dict when there is none (no dropout)."""
    paths = sorted(k for k in flat if k.rsplit(".", 1)[-1] == DROPOUT_KEY)
    if not paths:
        return flat
    keys = jax.random.key_data(jax.random.split(key, len(paths)))
    return {**flat, **{p: keys[i] for i, p in enumerate(paths)}}


# ---- the adapter file -------------------------------------------------------------------------------------------

class Adapters(NamedTuple):
    """An adapter file's contents: ``layers`` ``{module path: (A [in, r], B [r, out])}`` float32, ``alpha`` per
    module, and svd_jax's ``settings`` and ``base`` entries (empty for files written elsewhere)."""

    layers: dict[str, tuple[np.ndarray, np.ndarray]]
    alpha: dict[str, float]
    settings: dict
    base: dict


def save_adapters(path, model, settings: dict | None = None, base: dict | None = None) -> Path:
    """Write the adapters of ``model`` (float32, diffusers/PEFT naming; see the module docstring) to ``path``,
    through a temporary sibling renamed at the end."""
    from safetensors.numpy import save_file

    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    alphas = {layer.alpha for layer in layers.values()}
    ranks = {layer.rank for layer in layers.values()}
    if len(alphas) != 1 or len(ranks) != 1:
        raise ValueError(f"adapters of one file share rank and alpha, got ranks {sorted(ranks)}, alphas {sorted(alphas)}")
    tensors = {}
    for name, layer in layers.items():
        a, b = (np.asarray(jax.device_get(v.get_value()), np.float32) for v in (layer.lora_a, layer.lora_b))
        tensors[f"{FILE_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{FILE_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    dropout = next(iter(layers.values())).dropout
    peft = {"r": ranks.pop(), "lora_alpha": alphas.pop(), "lora_dropout": dropout, "target_modules": sorted(layers),
            "bias": "none", "init_lora_weights": True, "use_dora": False}
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps({FILE_PREFIX + k: v for k, v in peft.items()}, sort_keys=True),
                SETTINGS_KEY: json.dumps(settings or {}, sort_keys=True),
                BASE_KEY: json.dumps(base or {}, sort_keys=True)}
    path = Path(path)
    with atomic_file(path) as scratch:
        save_file(tensors, str(scratch), metadata=metadata)
    return path


def read_adapters(path) -> Adapters:
    """Read an adapter file written by :func:`save_adapters` or by diffusers/PEFT (UNet LoRA, PEFT naming)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensors and all(k.startswith(FILE_PREFIX) for k in tensors):
        tensors = {k[len(FILE_PREFIX):]: v for k, v in tensors.items()}
    peft = {k.removeprefix(FILE_PREFIX): v for k, v in json.loads(header.get(METADATA_KEY) or "{}").items()}
    if peft.get("alpha_pattern") or peft.get("rank_pattern") or peft.get("use_dora"):
        raise ValueError(f"{path}: per-module alpha/rank patterns and DoRA are not supported")
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    expected = {f"{n}.lora_{s}.weight" for n in names for s in "AB"}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)[:4]
        raise ValueError(f"{path} is not a PEFT-named UNet LoRA file (lora_A/lora_B weights per module): {odd}")
    layers, alpha = {}, {}
    for n in names:
        a, b = tensors[f"{n}.lora_A.weight"].T, tensors[f"{n}.lora_B.weight"].T
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"{path}: {n} has lora_A {a.T.shape} and lora_B {b.T.shape}, not a linear LoRA pair")
        layers[n] = (np.asarray(a, np.float32), np.asarray(b, np.float32))
        alpha[n] = float(peft.get("lora_alpha", a.shape[1]))  # diffusers: no alpha recorded means alpha = rank
    return Adapters(layers, alpha, json.loads(header.get(SETTINGS_KEY) or "{}"),
                    json.loads(header.get(BASE_KEY) or "{}"))


def apply_adapters(model, adapters: Adapters, scale: float = 1.0, merge: bool = True) -> list[str]:
    """Put ``adapters`` on ``model`` in place: merged into the kernels (``merge``), or as :class:`LoRALinear`
    layers whose scale :func:`set_scale` changes later. Every adapter must find a linear layer of its shapes."""
    linears = linear_layers(model)
    for name, (a, b) in adapters.layers.items():
        layer = linears.get(name)
        if layer is None or isinstance(layer, LoRALinear):
            raise ValueError(f"LoRA adapter {name!r} has no (unadapted) linear layer of that path in this UNet")
        if (a.shape[0], b.shape[1]) != (layer.in_features, layer.out_features):
            raise ValueError(f"LoRA adapter {name!r} is {a.shape[0]}->{b.shape[1]}, the layer is "
                             f"{layer.in_features}->{layer.out_features}: trained for another model")
    for name, (a, b) in adapters.layers.items():
        layer = linears[name]
        sharding = getattr(layer.kernel.get_value(), "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):  # adapters are small: replicated
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        a, b = (jnp.asarray(v) if sharding is None else jax.device_put(v, sharding) for v in (a, b))
        _replace(model, name, LoRALinear(layer, a, b, adapters.alpha[name], scale=scale))
    if merge:
        merge_adapters(model)
    return sorted(adapters.layers)
