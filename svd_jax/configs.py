"""Architecture configurations: one frozen dataclass per model, with presets and readers for upstream configs.

These describe *what* a model is (sizes, layer counts, norm epsilons). *How* it runs (dtypes, attention kernel)
lives in :mod:`svd_jax.policy`. Every field that changes numerics (norm epsilons, activation) is data here, taken
from the source checkpoint's own convention, never a library default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

# Bounds on what a config read from a file may ask for. Every count and size is checked on read, so a config
# cannot make the converter or the loader build millions of modules (a layer count of 10**7) before any shape is
# compared; the bounds are far above every released SVD/CLIP size.
MAX_BLOCKS = 8  # resolution levels of the UNet or the VAE
MAX_LAYERS = 64  # layers of a tower, or per block
MAX_SIZE = 1 << 16  # channels, widths, heads, frames, pixels


def _checked_field(where: str, value, hint, bounds: tuple[int, int], is_eps: bool):
    """``value`` as the type ``hint`` names, within ``bounds`` (integers) or finite (floats; an eps in (0, 1))."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_BLOCKS:
            raise ValueError(f"{where} must be a list of 1 to {MAX_BLOCKS} entries, got {value!r}")
        return tuple(_checked_field(where, v, typing.get_args(hint)[0], bounds, is_eps) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        if not bounds[0] <= value <= bounds[1]:
            raise ValueError(f"{where} must be between {bounds[0]} and {bounds[1]}, got {value}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        if is_eps and not 0 < value < 1:
            raise ValueError(f"{where} must be between 0 and 1 (exclusive), got {value}")
        return float(value)
    return value


def _as_tuple(value, length: int, name: str) -> tuple:
    """Upstream configs give either one value for every block or one per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != length:
            raise ValueError(f"config field {name!r} has {len(value)} entries, expected {length}")
        return tuple(value)
    return (value,) * length


class _ConfigIO:
    """Round trip through plain JSON dicts with a ``kind`` tag, so a converted folder says what it holds.

    Every field is checked against its annotation (``"1"`` or ``8.0`` for an integer is refused, an integer for a
    float is taken as that float, a list for a tuple as that tuple) and against the bounds above, before the
    class's own consistency checks (:meth:`_validate`)."""

    kind: ClassVar[str]
    # Fields bounded more tightly than MAX_SIZE: name -> (lowest, highest). Every other integer is in [1, MAX_SIZE].
    LIMITS: ClassVar[dict[str, tuple[int, int]]] = {}

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _checked_field(f"{self.kind} config field {f.name!r}", getattr(self, f.name), hints[f.name],
                                   self.LIMITS.get(f.name, (1, MAX_SIZE)), f.name.endswith("eps"))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ValueError(f"config is for {kind!r}, not {cls.kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.kind} config fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_ConfigIO):
    """``CLIPVisionModelWithProjection``; the SVD image encoder is OpenCLIP ViT-H/14."""

    kind: ClassVar[str] = "clip_vision"
    LIMITS: ClassVar[dict[str, tuple[int, int]]] = {"num_hidden_layers": (1, MAX_LAYERS)}

    hidden_size: int = 1280
    intermediate_size: int = 5120
    projection_dim: int = 1024
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_act not in ("gelu", "quick_gelu", "gelu_new"):
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_h_14(cls) -> "CLIPVisionConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":
        return cls(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                   num_attention_heads=4, image_size=224, patch_size=32)

    @classmethod
    def from_transformers_config(cls, config: dict[str, Any]) -> "CLIPVisionConfig":
        """Read a transformers ``CLIPVisionConfig`` dict (the ``image_encoder/config.json`` of a diffusers repo)."""
        if "vision_config" in config:  # a full CLIPConfig
            config = {**config["vision_config"], "projection_dim": config.get("projection_dim", 512)}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})


# GroupNorm epsilons of the UNet's resnets, per block. diffusers hard-codes 1e-6 in the cross-attention down
# blocks and in every up block (``get_up_block`` never forwards ``resnet_eps``) and uses 1e-5 in the plain down
# block and the mid block; the original (sgm) code uses 1e-5 everywhere.
_DIFFUSERS_DOWN_EPS = {"CrossAttnDownBlockSpatioTemporal": 1e-6, "DownBlockSpatioTemporal": 1e-5}
_DIFFUSERS_UP_EPS = {"CrossAttnUpBlockSpatioTemporal": 1e-6, "UpBlockSpatioTemporal": 1e-6}
ORIGINAL_RESNET_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class UNetConfig(_ConfigIO):
    """``UNetSpatioTemporalConditionModel``. Presets: :meth:`svd` (14 frames), :meth:`svd_xt` (25 frames)."""

    kind: ClassVar[str] = "unet_spatio_temporal"
    LIMITS: ClassVar[dict[str, tuple[int, int]]] = {"layers_per_block": (1, MAX_LAYERS),
                                                    "transformer_layers_per_block": (1, MAX_LAYERS)}

    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
    up_block_types: tuple[str, ...] = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    cross_attention_dim: tuple[int, ...] = (1024, 1024, 1024, 1024)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 25
    sample_size: int | None = 96
    norm_num_groups: int = 32
    # resnet GroupNorm eps per down block, for the mid block, per up block; transformer GN eps; out GN eps.
    down_resnet_eps: tuple[float, ...] = (1e-6, 1e-6, 1e-6, 1e-5)
    mid_resnet_eps: float = 1e-5
    up_resnet_eps: tuple[float, ...] = (1e-6, 1e-6, 1e-6, 1e-6)
    transformer_norm_eps: float = 1e-6
    out_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "layers_per_block", "cross_attention_dim",
                     "transformer_layers_per_block", "num_attention_heads", "down_resnet_eps", "up_resnet_eps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNet config field {name!r} needs {n} entries (one per block)")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(f"block channels {ch} not divisible by norm_num_groups {self.norm_num_groups}")
        for ch, heads in zip(self.block_out_channels, self.num_attention_heads):
            if ch % heads:
                raise ValueError(f"block channels {ch} not divisible by num_attention_heads {heads}")
        if self.projection_class_embeddings_input_dim % self.addition_time_embed_dim:
            raise ValueError(f"projection_class_embeddings_input_dim {self.projection_class_embeddings_input_dim} "
                             f"is not a multiple of addition_time_embed_dim {self.addition_time_embed_dim}")
        if len(set(self.cross_attention_dim)) != 1:
            raise ValueError(f"every block must take the same context width; cross_attention_dim is "
                             f"{self.cross_attention_dim}")

    @property
    def num_added_time_ids(self) -> int:
        """How many conditioning scalars ``added_time_ids`` holds per video (SVD: fps-1, motion bucket, aug)."""
        return self.projection_class_embeddings_input_dim // self.addition_time_embed_dim

    @property
    def downsample_factor(self) -> int:
        """The latent height and width must be multiples of this (one halving per block but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def svd(cls) -> "UNetConfig":
        """stable-video-diffusion-img2vid (14 frames) with diffusers' numerics."""
        return cls(num_frames=14)

    @classmethod
    def svd_xt(cls) -> "UNetConfig":
        """stable-video-diffusion-img2vid-xt (25 frames; also xt-1.1) with diffusers' numerics."""
        return cls(num_frames=25)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """The shape of diffusers' own test UNet: two levels, 32/64 channels."""
        return cls.from_diffusers_config({
            "block_out_channels": [32, 64], "layers_per_block": 2, "cross_attention_dim": 32,
            "num_attention_heads": [4, 8], "addition_time_embed_dim": 32,
            "projection_class_embeddings_input_dim": 96, "num_frames": 2, "sample_size": 8,
            "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
            "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"],
        })

    def with_original_norm_eps(self) -> "UNetConfig":
        """The original (sgm) checkpoint's numerics: every resnet GroupNorm uses eps 1e-5."""
        n = len(self.block_out_channels)
        return dataclasses.replace(self, down_resnet_eps=(ORIGINAL_RESNET_EPS,) * n, mid_resnet_eps=ORIGINAL_RESNET_EPS,
                                   up_resnet_eps=(ORIGINAL_RESNET_EPS,) * n)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> "UNetConfig":
        """Read a diffusers ``unet/config.json``; norm epsilons follow diffusers' numerics."""
        defaults = cls()
        down = tuple(config.get("down_block_types", defaults.down_block_types))
        up = tuple(config.get("up_block_types", defaults.up_block_types))
        n = len(config.get("block_out_channels", defaults.block_out_channels))
        for name, table in (("down_block_types", _DIFFUSERS_DOWN_EPS), ("up_block_types", _DIFFUSERS_UP_EPS)):
            unknown = [b for b in (down if name.startswith("down") else up) if b not in table]
            if unknown:
                raise ValueError(f"unsupported UNet {name}: {', '.join(unknown)}")
        per_block = {}
        # diffusers' own defaults: one value for every block, except the heads
        upstream_defaults = {"layers_per_block": 2, "cross_attention_dim": 1024, "transformer_layers_per_block": 1,
                             "num_attention_heads": defaults.num_attention_heads}
        for name, default in upstream_defaults.items():
            value = config.get(name, default)
            if name == "transformer_layers_per_block" and isinstance(value, (list, tuple)):
                if any(isinstance(v, (list, tuple)) for v in value):
                    raise ValueError("per-layer transformer_layers_per_block (nested lists) is not supported")
            per_block[name] = _as_tuple(value, n, name)
        return cls(
            in_channels=config.get("in_channels", defaults.in_channels),
            out_channels=config.get("out_channels", defaults.out_channels),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(config.get("block_out_channels", defaults.block_out_channels)),
            addition_time_embed_dim=config.get("addition_time_embed_dim", defaults.addition_time_embed_dim),
            projection_class_embeddings_input_dim=config.get(
                "projection_class_embeddings_input_dim", defaults.projection_class_embeddings_input_dim),
            num_frames=config.get("num_frames", defaults.num_frames),
            sample_size=config.get("sample_size", defaults.sample_size),
            down_resnet_eps=tuple(_DIFFUSERS_DOWN_EPS[b] for b in down),
            mid_resnet_eps=1e-5,
            up_resnet_eps=tuple(_DIFFUSERS_UP_EPS[b] for b in up),
            **per_block,
        )


@dataclasses.dataclass(frozen=True)
class VAEConfig(_ConfigIO):
    """``AutoencoderKLTemporalDecoder`` (``decoder="temporal"``) or the per-frame ``AutoencoderKL``
    image decoder of the ``*_image_decoder`` checkpoints (``decoder="image"``).

    Both share the KL-f8 encoder (+ ``quant_conv``). ``norm_eps`` is every spatial/attention/output GroupNorm's
    eps, ``temporal_norm_eps`` the temporal resblocks' (the same in diffusers and the original code). The
    temporal variant always uses 32 groups: diffusers hard-codes them for that class.
    """

    kind: ClassVar[str] = "vae"
    LIMITS: ClassVar[dict[str, tuple[int, int]]] = {"layers_per_block": (1, MAX_LAYERS)}

    decoder: str = "temporal"
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    sample_size: int = 768
    norm_eps: float = 1e-6
    temporal_norm_eps: float = 1e-5

    def _validate(self) -> None:
        if self.decoder not in ("temporal", "image"):
            raise ValueError(f"VAE decoder must be 'temporal' or 'image', not {self.decoder!r}")
        if self.decoder == "temporal" and self.norm_num_groups != 32:
            raise ValueError(f"the temporal VAE uses 32 GroupNorm groups, not {self.norm_num_groups}")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(f"VAE channels {ch} not divisible by norm_num_groups {self.norm_num_groups}")
        if not self.scaling_factor:
            raise ValueError("VAE scaling_factor must not be 0")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: 8 for SVD."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def svd(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def svd_image_decoder(cls) -> "VAEConfig":
        return cls(decoder="image")

    @classmethod
    def tiny(cls, decoder: str = "temporal") -> "VAEConfig":
        return cls(decoder=decoder, block_out_channels=(32, 64), layers_per_block=1, sample_size=32)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> "VAEConfig":
        """Read a diffusers ``vae/config.json`` of ``AutoencoderKLTemporalDecoder`` or ``AutoencoderKL``."""
        class_name = config.get("_class_name", "AutoencoderKLTemporalDecoder")
        if class_name not in ("AutoencoderKLTemporalDecoder", "AutoencoderKL"):
            raise ValueError(f"unsupported VAE class {class_name!r}")
        decoder = "temporal" if class_name == "AutoencoderKLTemporalDecoder" else "image"
        defaults = cls()
        channels = tuple(config.get("block_out_channels", defaults.block_out_channels))
        block_types = config.get("down_block_types", ["DownEncoderBlock2D"] * len(channels))
        if list(block_types) != ["DownEncoderBlock2D"] * len(channels):
            raise ValueError(f"unsupported VAE down_block_types {list(block_types)} for {len(channels)} blocks")
        if decoder == "image":
            up_types = config.get("up_block_types", ["UpDecoderBlock2D"] * len(channels))
            if list(up_types) != ["UpDecoderBlock2D"] * len(channels):
                raise ValueError(f"unsupported VAE up_block_types {list(up_types)} for {len(channels)} blocks")
            if config.get("act_fn", "silu") != "silu":
                raise ValueError(f"unsupported VAE act_fn {config['act_fn']!r}")
            if not config.get("use_quant_conv", True) or not config.get("use_post_quant_conv", True):
                raise ValueError("VAE without quant_conv/post_quant_conv is not supported")
            if not config.get("mid_block_add_attention", True):
                raise ValueError("VAE without mid-block attention is not supported")
        # AutoencoderKLTemporalDecoder has no norm_num_groups: diffusers builds it with 32 groups.
        groups = config.get("norm_num_groups", defaults.norm_num_groups) if decoder == "image" else 32
        return cls(
            decoder=decoder,
            in_channels=config.get("in_channels", defaults.in_channels),
            out_channels=config.get("out_channels", defaults.out_channels),
            block_out_channels=channels,
            layers_per_block=config.get("layers_per_block", defaults.layers_per_block),
            latent_channels=config.get("latent_channels", defaults.latent_channels),
            norm_num_groups=groups,
            scaling_factor=config.get("scaling_factor", defaults.scaling_factor),
            force_upcast=config.get("force_upcast", defaults.force_upcast),
            sample_size=config.get("sample_size", defaults.sample_size),
        )


CONFIG_KINDS = {cls.kind: cls for cls in (CLIPVisionConfig, UNetConfig, VAEConfig)}


def config_from_dict(data: dict[str, Any]):
    """The config dataclass a converted folder's ``config.json`` describes."""
    kind = data.get("kind")
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown config kind {kind!r}; expected one of {sorted(CONFIG_KINDS)}")
    return CONFIG_KINDS[kind].from_dict(data)
