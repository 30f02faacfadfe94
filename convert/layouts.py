"""Source layouts: which components a source holds, under which canonical (diffusers/transformers) names.

Accepted sources:

* a diffusers repo folder (``model_index.json`` and/or ``unet/``, ``vae/``, ``image_encoder/`` sub-folders);
* one component folder (``config.json`` + ``model[.fp16].safetensors`` or
  ``diffusion_pytorch_model[.fp16].safetensors``);
* one component ``.safetensors`` file in diffusers/transformers naming;
* the original single file (``svd*.safetensors``, ``*_image_decoder.safetensors``), whose prefixes are mapped by
  the ``convert/original_*`` modules.

Which component a file holds is decided from its keys, never from its name. Architecture comes from
``--config DIR`` (a diffusers-like folder of ``<component>/config.json``), else from the source's own config,
else from the preset of the real model.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ConversionError
from convert.reader import DTYPES, SafetensorsFile
from convert.rules import Transform, transformed_shape
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig

COMPONENTS = ("image_encoder", "unet", "vae")
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors")
# Modules that map one component of the original single file; each has PREFIXES, present(), default_config()
# and rename() (see convert/original_clip.py for the contract).
ORIGINAL_MAPPERS = {"image_encoder": "convert.original_clip", "unet": "convert.original_unet",
                    "vae": "convert.original_vae"}


@dataclass(frozen=True)
class TensorRef:
    """A canonical tensor: read ``key`` from ``file`` and apply ``transform`` (a layout fix such as a qkv split)."""

    file: SafetensorsFile
    key: str
    transform: Transform | None = None

    @property
    def shape(self) -> tuple[int, ...] | None:
        return transformed_shape(self.transform, self.file.shape(self.key))

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.file.dtype(self.key)]

    def read(self) -> np.ndarray:
        array = self.file.get(self.key)
        return array if self.transform is None else self.transform(array)


@dataclass
class ComponentSource:
    component: str
    config: Any
    layout: str
    tensors: dict[str, TensorRef]
    ignored: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[SafetensorsFile]:
        return list({id(t.file): t.file for t in self.tensors.values()}.values())


# The upstream classes whose config.json each component reads (diffusers' ``_class_name``, transformers'
# ``architectures``); a config naming another class is for another model.
UPSTREAM_CLASSES = {"image_encoder": ("CLIPVisionModelWithProjection", "CLIPVisionModel", "CLIPModel"),
                    "unet": ("UNetSpatioTemporalConditionModel",),
                    "vae": ("AutoencoderKLTemporalDecoder", "AutoencoderKL")}


def config_from_upstream(component: str, data: dict, origin: str):
    """A component config from an upstream ``config.json`` dict."""
    if not isinstance(data, dict):
        raise ConversionError(f"{origin}: not a usable {component} config (not a JSON object)")
    architectures = data.get("architectures") if isinstance(data.get("architectures"), list) else []
    named = [n for n in [data.get("_class_name"), *architectures] if n is not None]
    if named and not any(n in UPSTREAM_CLASSES[component] for n in named):
        raise ConversionError(f"{origin}: holds a config for {named[0]}, not for the {component} "
                              f"({' or '.join(UPSTREAM_CLASSES[component])})")
    try:
        if component == "image_encoder":
            return CLIPVisionConfig.from_transformers_config(data)
        if component == "unet":
            return UNetConfig.from_diffusers_config(data)
        return VAEConfig.from_diffusers_config(data)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{origin}: not a usable {component} config ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConversionError(f"{path}: cannot read JSON config ({type(e).__name__}: {str(e)[:200]})") from None


def override_config(config_dir: Path | None, component: str):
    """The config ``--config DIR`` gives for ``component``, or None."""
    if config_dir is None:
        return None
    path = Path(config_dir) / component / "config.json"
    return config_from_upstream(component, _read_json(path), str(path)) if path.is_file() else None


def component_of_keys(keys: list[str]) -> str | None:
    """Which component a file in diffusers/transformers naming holds, from its keys."""
    key_set = set(keys)
    if any(k.startswith("vision_model.") for k in keys) and "visual_projection.weight" in key_set:
        return "image_encoder"
    if "time_embedding.linear_1.weight" in key_set and "add_embedding.linear_1.weight" in key_set:
        return "unet"
    if "encoder.conv_in.weight" in key_set and "decoder.conv_in.weight" in key_set:
        return "vae"
    return None


def _is_original(keys: list[str]) -> bool:
    prefixes = tuple(p for name in ORIGINAL_MAPPERS.values() for p in _mapper(name).PREFIXES)
    return any(k.startswith(prefixes) for k in keys)


def _mapper(module_name: str):
    return importlib.import_module(module_name)


def _component_file(file: SafetensorsFile, component: str | None, config, layout: str) -> ComponentSource:
    keys = file.keys()
    found = component_of_keys(keys)
    if found is None:
        raise ConversionError(f"{file.path}: not an SVD checkpoint (no known layout; keys like {', '.join(keys[:3])})")
    if component is not None and found != component:
        raise ConversionError(f"{file.path}: holds a {found} checkpoint, but its folder or config says {component}")
    if found == "vae":
        decoder = "temporal" if "decoder.time_conv_out.weight" in keys else "image"
        if config is not None and config.decoder != decoder:
            raise ConversionError(f"{file.path}: holds a {decoder} VAE decoder, but its config says {config.decoder}")
        config = config or (VAEConfig.svd() if decoder == "temporal" else VAEConfig.svd_image_decoder())
    elif config is None:
        config = CLIPVisionConfig.vit_h_14() if found == "image_encoder" else UNetConfig.svd_xt()
    return ComponentSource(found, config, layout, {k: TensorRef(file, k) for k in keys})


def _component_folder(folder: Path, config_dir: Path | None, expected: str | None) -> ComponentSource:
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder}: no weights file ({' or '.join(WEIGHT_FILES)})")
    file = SafetensorsFile(weights)
    found = component_of_keys(file.keys())
    config = override_config(config_dir, found) if found else None
    if config is None and found and (folder / "config.json").is_file():
        config = config_from_upstream(found, _read_json(folder / "config.json"), str(folder / "config.json"))
    layout = "transformers" if found == "image_encoder" else "diffusers"
    return _component_file(file, expected, config, layout)


def _original_file(file: SafetensorsFile, config_dir: Path | None) -> list[ComponentSource]:
    keys = file.keys()
    claimed: set[str] = set()
    sources = []
    for component, module_name in ORIGINAL_MAPPERS.items():
        mapper = _mapper(module_name)
        own = [k for k in keys if k.startswith(mapper.PREFIXES)]
        claimed.update(own)
        if not mapper.present(own):
            continue
        config = override_config(config_dir, component)
        config = mapper.adapt_config(config, own) if config is not None else mapper.default_config(own, file.path.name)
        mapping, ignored = mapper.rename(own, config)
        stray = sorted(set(own) - {src for src, _ in mapping.values()} - set(ignored))
        if stray:
            raise ConversionError(f"{file.path}: unrecognised {component} keys: {', '.join(stray[:6])}"
                                  + (f" (+{len(stray) - 6} more)" if len(stray) > 6 else ""))
        tensors = {canonical: TensorRef(file, src, fn) for canonical, (src, fn) in mapping.items()}
        sources.append(ComponentSource(component, config, "original", tensors, sorted(ignored)))
    unclaimed = sorted(set(keys) - claimed)
    if unclaimed:
        raise ConversionError(f"{file.path}: unrecognised keys for an original SVD checkpoint: "
                              f"{', '.join(unclaimed[:6])}" + (f" (+{len(unclaimed) - 6} more)" if len(unclaimed) > 6 else ""))
    if not sources:
        raise ConversionError(f"{file.path}: no SVD component found")
    return sources


def detect(src: Path, config_dir: Path | None = None) -> list[ComponentSource]:
    """Every component a source holds, with its config and canonical tensors."""
    src = Path(src)
    if config_dir is not None and not Path(config_dir).is_dir():
        raise ConversionError(f"--config {config_dir}: no such folder")
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_file():
        file = SafetensorsFile(src)
        if _is_original(file.keys()):
            return _original_file(file, config_dir)
        found = component_of_keys(file.keys())
        return [_component_file(file, found, override_config(config_dir, found) if found else None,
                                "transformers" if found == "image_encoder" else "diffusers")]
    subfolders = [c for c in COMPONENTS if (src / c).is_dir()]
    if subfolders:
        return [_component_folder(src / c, config_dir, c) for c in subfolders]
    if any((src / name).is_file() for name in WEIGHT_FILES):
        return [_component_folder(src, config_dir, None)]
    raise ConversionError(f"{src}: neither a diffusers folder (unet/, vae/, image_encoder/), a component folder "
                          f"({' or '.join(WEIGHT_FILES[:2])}) nor a .safetensors file")
