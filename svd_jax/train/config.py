"""Fine-tuning configuration: frozen dataclasses read from a JSON or TOML file.

Defaults and where they come from:

* Noise levels (``objective.p_mean``, ``objective.p_std``): log sigma ~ N(0.7, 1.6^2), one sigma per clip. The
  original code's ``EDMSampling`` defaults to (-1.2, 1.2), the EDM paper's image setting; the SVD paper reports
  shifting the noise distribution towards higher noise for high-resolution video training (the released code
  holds no training config), and (0.7, 1.6) is what public SVD image-to-video fine-tuning code (SVD_Xtend's
  ``train_svd.py``) uses. Set (-1.2, 1.2) for sgm's defaults.
* Loss weighting: sgm ``VWeighting`` = ``EDMWeighting(sigma_data=1)``, w = (sigma^2 + 1) / sigma^2, the weighting
  that belongs to the v-prediction scalings (``VScalingWithEDMcNoise``) SVD uses. Not configurable.
* Conditioning-frame noise augmentation (``cond_aug_p_mean``, ``cond_aug_p_std``): per clip, the std of Gaussian
  pixel noise is drawn log-normal(-3.0, 0.5) (median 0.05, covering the 0.02 used at inference), as in SVD_Xtend;
  sgm draws it with a pluggable ``sigma_sampler`` in ``VideoPredictionEmbedderWithEncoder``. The drawn value is
  also the ``noise_aug_strength`` the UNet is conditioned on.
* Image-conditioning dropout (``cond_dropout``): 0.1, sgm's usual ``ucg_rate``; the CLIP embedding and the
  conditioning latent of a clip are zeroed together, which is exactly the unconditional branch of
  classifier-free guidance at inference.
* Video latents are sampled from the VAE posterior and scaled by the VAE's ``scaling_factor`` (sgm
  ``encode_first_stage``); ``latent_sample = false`` uses the posterior mean instead. The conditioning latent is
  the posterior mean of the noise-augmented first frame, unscaled (as at inference).
* Motion bucket: 127 (SVD's inference default) unless given per clip; fps from the video file (divided by
  ``frame_stride``), or 7 (the pipeline default) for frame folders without metadata. The UNet sees fps - 1.
* AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01), linear warm-up over 500 steps to a constant learning
  rate of 1e-5 (``decay_steps`` adds a cosine decay to 0), global-norm gradient clipping at 1.0: conventional
  fine-tuning settings, not from the paper.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from svd_jax.policy import REMAT_POLICIES

TRAINABLE_PRESETS = ("all", "temporal")
COMPUTE_DTYPES = ("bfloat16", "float32")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(value, name: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
           f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    p_mean: float = 0.7
    p_std: float = 1.6
    cond_aug_p_mean: float = -3.0
    cond_aug_p_std: float = 0.5
    cond_dropout: float = 0.1
    latent_sample: bool = True

    def __post_init__(self):
        _check(self.p_std > 0 and self.cond_aug_p_std >= 0, "objective: p_std must be > 0 and cond_aug_p_std >= 0")
        _check(0.0 <= self.cond_dropout <= 1.0, f"objective.cond_dropout must be in [0, 1], got {self.cond_dropout}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad_norm: float = 1.0
    decay_steps: int = 0  # > 0: cosine decay from learning_rate to 0 over this many steps after the warm-up
    # "all", "temporal" (temporal res blocks, temporal transformer blocks, time_pos_embed, time_mixer), or a list
    # of regular expressions searched in each parameter's dotted path (``down_blocks.0.resnets.1.time_mixer...``).
    trainable: Any = "all"

    def __post_init__(self):
        _check(self.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
               f"optimizer.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        _check(isinstance(self.decay_steps, int) and self.decay_steps >= 0,
               f"optimizer.decay_steps must be an integer >= 0, got {self.decay_steps!r}")
        _check(self.clip_grad_norm > 0, f"optimizer.clip_grad_norm must be > 0, got {self.clip_grad_norm}")
        if isinstance(self.trainable, str):
            _check(self.trainable in TRAINABLE_PRESETS,
                   f"optimizer.trainable must be one of {TRAINABLE_PRESETS} or a list of patterns, "
                   f"got {self.trainable!r}")
        else:
            patterns = tuple(self.trainable)
            _check(bool(patterns) and all(isinstance(p, str) for p in patterns),
                   f"optimizer.trainable patterns must be a non-empty list of strings, got {self.trainable!r}")
            object.__setattr__(self, "trainable", patterns)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``[lora]``: ``rank`` > 0 trains low-rank adapters (:mod:`svd_jax.lora`) instead of the UNet's weights."""

    rank: int = 0  # 0: no LoRA (full or ``optimizer.trainable`` fine-tuning)
    alpha: float | None = None  # the update is scaled by alpha / rank; default alpha = rank (scale 1)
    dropout: float = 0.0  # dropout on the adapters' inputs
    # named groups ("attention": q/k/v/out of the spatial transformer blocks, "feed_forward": their GEGLU
    # feed-forward, "temporal": every linear layer of the temporal transformer blocks) or regular expressions
    # searched in a linear layer's dotted path
    targets: Any = ("attention",)

    def __post_init__(self):
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 0,
               f"lora.rank must be an integer >= 0, got {self.rank!r}")
        _check(self.alpha is None or (isinstance(self.alpha, (int, float)) and self.alpha > 0),
               f"lora.alpha must be > 0, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
               f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        _check(not isinstance(self.targets, str) and bool(self.targets)
               and all(isinstance(t, str) for t in self.targets),
               f"lora.targets must be a non-empty list of group names or patterns, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""
    num_frames: int = 14
    height: int = 576
    width: int = 1024
    frame_stride: int = 1
    fps: float | None = None  # overrides every clip's frame rate when set
    motion_bucket_id: int = 127  # for clips without one in the folder's metadata.json
    cache_dir: str | None = None  # encode every video once into this folder, then train from it

    def __post_init__(self):
        _check(bool(self.path), "data.path is required: a folder of videos or of frame folders")
        for name in ("num_frames", "height", "width", "frame_stride"):
            _positive(getattr(self, name), f"data.{name}")
        _check(self.fps is None or self.fps > 0, f"data.fps must be > 0, got {self.fps}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    every: int = 0  # write a sample video every N steps (0: never)
    num_inference_steps: int = 25
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    image: str | None = None  # default: the first frame of the dataset's first clip
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = ""  # a converted folder, a diffusers folder / original file, a Hub id, or "tiny"
    output_dir: str = ""
    data: DataConfig | None = None
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    steps: int = 1000
    batch_size: int = 1
    seed: int = 0
    compute_dtype: str = "bfloat16"  # parameters and optimizer state are always float32
    # gradient checkpointing of every UNet resnet and transformer: "block" (keep only each layer's input), "dots"
    # (also keep the linear layers' outputs: less recomputation, more memory) or "none"; true/false mean
    # "block"/"none"
    remat: Any = "block"
    shard_params: bool = False  # FSDP: split parameters and optimizer state across the devices
    shard_min_size: int = 2 ** 18  # with shard_params, smaller parameters stay replicated
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10

    def __post_init__(self):
        _check(bool(self.model), "model is required: a converted folder, a diffusers folder, a Hub id or 'tiny'")
        _check(bool(self.output_dir), "output_dir is required")
        _check(isinstance(self.data, DataConfig), "a [data] section with at least data.path is required")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "shard_min_size"):
            _positive(getattr(self, name), name)
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        _check(self.compute_dtype in COMPUTE_DTYPES,
               f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "block" if self.remat else "none")
        _check(self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES} (or true/false), got {self.remat!r}")
        _check(not self.lora.enabled or self.optimizer.trainable == "all",
               "optimizer.trainable does not apply with [lora] (the adapters are what trains); remove one of them")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "objective": ObjectiveConfig, "optimizer": OptimizerConfig, "sample": SampleConfig,
             "lora": LoRAConfig}


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a table/object, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {where} option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return cls(**values)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested dicts; unknown keys are errors."""
    values = dict(values)
    for section, cls in _SECTIONS.items():
        if section in values:
            values[section] = _build(cls, values[section], section)
    return _build(TrainConfig, values, "train config")


def load_config(path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a ``.json`` or ``.toml`` config file; ``overrides`` (dotted keys, e.g. ``{"optimizer.learning_rate":
    1e-4}``) replace values from the file. Relative ``data.path``/``output_dir``/``cache_dir`` stay as written
    (relative to the working directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    if path.suffix == ".json":
        values = json.loads(path.read_text())
    elif path.suffix == ".toml":
        if sys.version_info < (3, 11):
            raise ValueError(f"{path}: TOML configs need Python 3.11+ (tomllib); use a .json config")
        import tomllib

        values = tomllib.loads(path.read_text())
    else:
        raise ValueError(f"{path}: the config must be a .json or .toml file")
    # Each override sets one dotted key in place. Not flax.traverse_util's flatten/unflatten round trip: that
    # rewrites the whole tree, drops empty tables and cannot replace a table by a value (or a value by a table).
    for key, value in (overrides or {}).items():
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(values)
