"""Stable Video Diffusion image-to-video in JAX/Flax."""

__version__ = "0.1.0"

from svd_jax import lora
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig
from svd_jax.bulk import batch
from svd_jax.continuation import extend
from svd_jax.display import show
from svd_jax.loader import SVDModels, enable_compilation_cache, load
from svd_jax.pipeline import PRESETS, Pipeline, generate
from svd_jax.policy import Policy
from svd_jax.video import save_video

__all__ = ["load", "generate", "batch", "extend", "Pipeline", "enable_compilation_cache", "save_video", "show",
           "PRESETS", "SVDModels", "Policy", "CLIPVisionConfig", "UNetConfig", "VAEConfig", "lora", "__version__"]
