"""Helpers for the training tests: a tiny base model folder and a synthetic clip set of moving squares."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import PIL.Image
from flax import nnx

from svd_jax.components import abstract_model
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig
from svd_jax.train.checkpoints import save_models

# The smallest UNet the architecture allows (one level, one layer), a three-level VAE (32x32 pixels -> 8x8
# latents) and a one-layer CLIP tower with 16 patches: compile time dominates these tests.
UNET = UNetConfig.from_diffusers_config({
    "block_out_channels": [32], "layers_per_block": 1, "cross_attention_dim": 16, "num_attention_heads": [2],
    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 24, "num_frames": 3, "sample_size": 8,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"], "up_block_types": ["CrossAttnUpBlockSpatioTemporal"]})
VAE = VAEConfig(block_out_channels=(32, 32, 32), layers_per_block=1, sample_size=32)
CLIP = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=16, num_hidden_layers=1,
                        num_attention_heads=4, image_size=224, patch_size=56)


def random_model(component: str, config, seed: int):
    """The component with host-drawn weights: normal(0, 1/sqrt(fan_in)) kernels, unit norm scales, zero biases
    (as fast as building abstractly; eager per-parameter initialisation takes many seconds)."""
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(abstract_model(component, config), nnx.Param, ...)
    for path, var in nnx.to_flat_state(params):
        shape, name = var.get_value().shape, str(path[-1])
        if name == "scale":
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        else:
            value = rng.normal(0.0, (np.prod(shape[:-1]) if len(shape) > 1 else 1) ** -0.5, shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    return nnx.merge(graphdef, params, rest)


def write_base_model(folder: Path, seed: int = 0) -> Path:
    return save_models(folder, {"unet": random_model("unet", UNET, seed), "vae": random_model("vae", VAE, seed + 1),
                                "image_encoder": random_model("image_encoder", CLIP, seed + 2)})


def square_frame(video: int, index: int, size: int = 32) -> np.ndarray:
    """A white 8x8 square moving over a background whose colour identifies the video."""
    frame = np.zeros((size, size, 3), np.uint8)
    frame[...] = (30 * video, 40, 60)
    x, y = (4 * index + 7 * video) % (size - 8), (3 * video + 2 * index) % (size - 8)
    frame[y:y + 8, x:x + 8] = 255
    return frame


def write_frame_folders(root: Path, videos: int, frames: int, size: int = 32) -> Path:
    for v in range(videos):
        folder = root / f"clip{v}"
        folder.mkdir(parents=True)
        for i in range(frames):
            PIL.Image.fromarray(square_frame(v, i, size)).save(folder / f"{i:03d}.png")
    return root
