"""The components a converted folder can hold, and how to build each one abstractly.

A converted folder has one sub-folder per component (``image_encoder``, ``unet``, ``vae``), each with a
``config.json`` (a :mod:`svd_jax.configs` dataclass) and an orbax ``params`` checkpoint.
"""

from __future__ import annotations

import importlib

from flax import nnx

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


def abstract_model(component: str, config, policy: Policy | None = None):
    """The component's module with ``jax.ShapeDtypeStruct`` leaves: built without allocating or computing."""
    cls = model_class(component, config)
    policy = policy or Policy.float32()
    return nnx.eval_shape(lambda: cls(config, policy=policy, rngs=nnx.Rngs(0)))
