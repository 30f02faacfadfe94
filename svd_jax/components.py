"""The components a converted folder can hold, and how to build each one abstractly.

A converted folder has one sub-folder per component (``image_encoder``, ``unet``, ``vae``), each with a
``config.json`` (a :mod:`svd_jax.configs` dataclass) and an orbax ``params`` checkpoint.
"""

from __future__ import annotations

import functools
import importlib

import jax
from flax import nnx

from svd_jax.checkpoint import path_key
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig
from svd_jax.policy import Policy

COMPONENT_CONFIGS = {"image_encoder": CLIPVisionConfig, "unet": UNetConfig, "vae": VAEConfig}

# Imported lazily so that loading one component does not import the modules of the others.
_MODEL_CLASSES = {
    ("image_encoder", None): "svd_jax.image_encoder:CLIPVisionModelWithProjection",
    ("unet", None): "svd_jax.unet:UNetSpatioTemporalConditionModel",
    ("vae", "temporal"): "svd_jax.vae:AutoencoderKLTemporalDecoder",
    ("vae", "image"): "svd_jax.vae:AutoencoderKL",
}


def model_class(component: str, config):
    """The NNX module class for a component's config."""
    if component not in COMPONENT_CONFIGS:
        raise ValueError(f"unknown component {component!r}; expected one of {sorted(COMPONENT_CONFIGS)}")
    if not isinstance(config, COMPONENT_CONFIGS[component]):
        raise TypeError(f"{component} needs a {COMPONENT_CONFIGS[component].__name__}, got {type(config).__name__}")
    variant = getattr(config, "decoder", None)
    module_name, class_name = _MODEL_CLASSES[(component, variant)].split(":")
    return getattr(importlib.import_module(module_name), class_name)


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` while building abstractly, where initial values are never computed.

    Every initializer gets the same key. A real ``nnx.Rngs`` would update its counter once per parameter under
    tracing, and each such traced update costs time proportional to the trace so far (flax looks up the sharding of
    the traced counter, and jax builds an error message by walking the whole trace): quadratic, about a minute for
    the full-size UNet instead of a few seconds.
    """

    def params(self):
        return jax.random.key(0)

    __call__ = params


def abstract_model(component: str, config, policy: Policy | None = None):
    """The component's module with ``jax.ShapeDtypeStruct`` leaves: built without allocating or computing."""
    cls = model_class(component, config)
    policy = policy or Policy.float32()
    return nnx.eval_shape(lambda: cls(config, policy=policy, rngs=_ShapeOnlyRngs()))


@functools.partial(jax.jit, static_argnums=1)
def _cast_all(arrays: dict, dtype: str) -> dict:
    """Every array to ``dtype`` in one program (one eager cast per parameter shape would compile dozens)."""
    return jax.tree.map(lambda a: a.astype(dtype), arrays)


def recast(module, component: str, policy: Policy):
    """The same weights as ``module`` under another policy (its dtypes), e.g. a float32 copy of a bf16 VAE."""
    graphdef, params, rest = nnx.split(abstract_model(component, module.config, policy), nnx.Param, ...)
    source = {path_key(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    cast = _cast_all(source, policy.param_dtype)
    for path, var in nnx.to_flat_state(params):
        var.set_value(cast[path_key(path)])
    return nnx.merge(graphdef, params, rest)
