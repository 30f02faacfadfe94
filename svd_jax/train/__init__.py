"""Fine-tuning of the SVD UNet: the EDM objective of the original code, a jitted AdamW step with gradient
checkpointing, mixed precision and trainable subsets, video-folder data with optional latent caching, orbax
checkpoints that resume bit for bit, and data-parallel / FSDP training over a device mesh, in one process or
several (one per host or per GPU: each reads its own part of every batch).

``svd-jax train CONFIG`` runs it from the command line (:mod:`svd_jax.train.cli`); ``Trainer(load_config(path))``
from Python.
"""

from svd_jax.train.config import TrainConfig, config_from_dict, load_config
from svd_jax.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "config_from_dict", "load_config"]
