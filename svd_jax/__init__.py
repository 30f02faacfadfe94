"""Stable Video Diffusion image-to-video in JAX/Flax."""

__version__ = "0.1.0"

from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig
from svd_jax.loader import SVDModels, load
from svd_jax.policy import Policy

__all__ = ["load", "SVDModels", "Policy", "CLIPVisionConfig", "UNetConfig", "VAEConfig", "__version__"]
