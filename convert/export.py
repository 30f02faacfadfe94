"""``export(src, out)``: a converted svd_jax folder -> a diffusers repo folder, the inverse of :func:`convert.convert`.

``src`` is a folder written by ``python -m convert`` or by training code (``svd_jax.checkpoint.save_params`` per
component plus its ``config.json`` and a ``manifest.json`` listing the components). ``out`` becomes a folder that
``StableVideoDiffusionPipeline.from_pretrained`` loads: ``unet/`` and ``vae/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``), ``image_encoder/`` (``config.json`` + ``model.safetensors``), and, when
all three components are present, ``model_index.json``, ``scheduler/scheduler_config.json`` (SVD's EDM Euler
settings) and ``feature_extractor/preprocessor_config.json`` (CLIP's). A folder holding only some components is
exported as those component folders alone, without the pipeline files: load them with
``<ModelClass>.from_pretrained(out, subfolder=...)``, or pass them to a pipeline loaded from another repo.

Names and layouts are the converter's own rules run backwards: :func:`convert.rules.expected_keys` gives, for each
PyTorch key, the NNX parameter and the forward transform, and :data:`INVERSE_TRANSFORMS` undoes that transform.
Weights keep their stored dtype unless ``dtype`` is given. Configs are written so that reading them back with the
converter's readers gives the same config; a field diffusers cannot express is an error. The one exception is
opt-in: a UNet converted from the original single file has sgm's GroupNorm eps (1e-5 in every resnet), which
diffusers' UNet hard-codes to 1e-6 in most blocks; exporting it needs ``accept_diffusers_eps=True``
(``--accept-diffusers-eps``), and the exported model then computes with diffusers' eps.

An image-decoder VAE (``decoder="image"``) is written as ``AutoencoderKL``; the pipeline loads it with a type
warning and decodes frame by frame. Weights are read group by group and written tensor by tensor: the full SVD-XT
UNet in float16 (3.05 GB) exports with a 2.4 GB peak resident size.

Like the converter, the output is written to a hidden sibling folder and renamed into place at the end; an
existing ``out`` is kept unless ``force``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from convert import rules
from convert.api import check_separate, written_error
from convert.errors import ConversionError
from convert.layouts import config_from_upstream
from svd_jax.checkpoint import PARAMS_DIR, load_params, stored_params
from svd_jax.components import COMPONENT_CONFIGS, abstract_model
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig
from svd_jax.lora import merged_kernel, read_adapters
from svd_jax.store import (CONFIG, MANIFEST, atomic_dir, read_config, read_manifest, scratch_path,
                           verify_component)

# The first diffusers release with the SVD classes; recorded as the version the configs are written for.
DIFFUSERS_VERSION = "0.24.0"
WEIGHT_FILES = {"image_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors"}
DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_STORED_DTYPES = {"float64": np.dtype(np.float64), **DTYPES}
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# The scheduler/scheduler_config.json of stabilityai/stable-video-diffusion-img2vid{,-xt}.
SVD_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
    "prediction_type": "v_prediction", "timestep_type": "continuous", "use_karras_sigmas": True,
    "sigma_min": 0.002, "sigma_max": 700.0, "timestep_spacing": "leading", "steps_offset": 1,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
    "interpolation_type": "linear", "trained_betas": None,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def linear_weight(kernel: np.ndarray) -> np.ndarray:
    """``kernel [in, out]`` -> ``nn.Linear.weight [out, in]``: the inverse of :func:`convert.rules.linear_kernel`."""
    return kernel.T


def conv_weight(kernel: np.ndarray) -> np.ndarray:
    """``kernel [*K, I, O]`` -> ``nn.ConvNd.weight [O, I, *K]``: the inverse of :func:`convert.rules.conv_kernel`."""
    return np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2)))


INVERSE_TRANSFORMS = {rules.linear_kernel: linear_weight, rules.conv_kernel: conv_weight}


# ---- configs: our dataclasses -> upstream config.json dicts ----

def _scalar_if_uniform(values: tuple):
    return values[0] if len(set(values)) == 1 else list(values)


def unet_config(config: UNetConfig) -> dict:
    """diffusers ``UNetSpatioTemporalConditionModel`` ``config.json``."""
    return {
        "_class_name": "UNetSpatioTemporalConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.sample_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": list(config.down_block_types), "up_block_types": list(config.up_block_types),
        "block_out_channels": list(config.block_out_channels),
        "addition_time_embed_dim": config.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": config.projection_class_embeddings_input_dim,
        "layers_per_block": _scalar_if_uniform(config.layers_per_block),
        "cross_attention_dim": _scalar_if_uniform(config.cross_attention_dim),
        "transformer_layers_per_block": _scalar_if_uniform(config.transformer_layers_per_block),
        "num_attention_heads": list(config.num_attention_heads),
        "num_frames": config.num_frames,
    }


def vae_config(config: VAEConfig) -> dict:
    """diffusers ``AutoencoderKLTemporalDecoder`` (``decoder="temporal"``) or ``AutoencoderKL`` ``config.json``."""
    n = len(config.block_out_channels)
    out = {
        "_class_name": "AutoencoderKLTemporalDecoder" if config.decoder == "temporal" else "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block, "latent_channels": config.latent_channels,
        "sample_size": config.sample_size, "scaling_factor": config.scaling_factor,
        "force_upcast": config.force_upcast,
    }
    if config.decoder == "image":
        out.update({"up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu",
                    "norm_num_groups": config.norm_num_groups, "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True})
    return out


def image_encoder_config(config: CLIPVisionConfig, dtype: str) -> dict:
    """transformers ``CLIPVisionModelWithProjection`` ``config.json`` (its fields share our names)."""
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, "dtype": dtype}


def feature_extractor_config(config: CLIPVisionConfig) -> dict:
    """transformers ``CLIPImageProcessor`` ``preprocessor_config.json`` as SVD's repos ship it (the pipeline turns
    its resize and crop off and resizes by itself)."""
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
            "size": {"shortest_edge": config.image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": config.image_size, "width": config.image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "do_convert_rgb": True}


def model_index(vae: VAEConfig) -> dict:
    return {"_class_name": "StableVideoDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
            "vae": ["diffusers", vae_config(vae)["_class_name"]]}


def upstream_config(component: str, config, dtype: str, accept_diffusers_eps: bool = False) -> tuple[dict, list[str]]:
    """The upstream ``config.json`` dict for ``config``, checked by reading it back with the converter's reader.
    Returns it with the eps fields diffusers cannot express (only with ``accept_diffusers_eps``; else an error)."""
    if component == "unet":
        upstream = unet_config(config)
    elif component == "vae":
        upstream = vae_config(config)
    else:
        upstream = image_encoder_config(config, dtype)
    read_back = config_from_upstream(component, upstream, f"the exported {component} config")
    differ = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(read_back, f.name)]
    described = "; ".join(f"{name}={_plain(getattr(config, name))} (diffusers: {_plain(getattr(read_back, name))})"
                          for name in differ)
    if any(not name.endswith("_eps") for name in differ):
        raise ConversionError(f"{component}: the upstream class cannot express this config: {described}")
    if differ and not accept_diffusers_eps:
        upstream_class = upstream.get("_class_name") or upstream["architectures"][0]
        raise ConversionError(
            f"{component}: {upstream_class} hard-codes norm epsilons that differ from this model's: {described} "
            "(a model converted from the original single file keeps sgm's numerics); the exported model would "
            "compute with the upstream eps: pass --accept-diffusers-eps (accept_diffusers_eps=True) to export anyway")
    return upstream, differ


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---- weights ----

def _read_group(param: str) -> str:
    """Parameters are read in groups (a list entry such as ``down_blocks.0``; else the top-level module), so that
    at most one group is in memory twice while orbax restores it."""
    parts = param.split(".")
    numbered = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    return ".".join(parts[: numbered + 1]) if numbered is not None else parts[0]


@functools.lru_cache(maxsize=8)
def _expected_keys(component: str, config) -> dict[str, rules.Target]:
    """The converter's ``{PyTorch key: Target}`` for a config (building the model abstractly takes seconds)."""
    return rules.expected_keys(abstract_model(component, config))


def _plan_tensors(component: str, folder: Path, config) -> tuple[dict[str, rules.Target], dict]:
    """``{PyTorch key: Target}`` and the stored ``{param: (shape, dtype)}``, after checking that the stored
    parameters are exactly the model's."""
    expected = _expected_keys(component, config)
    try:
        stored = stored_params(folder)
    except Exception as e:  # orbax's own exception types vary by version
        raise ConversionError(f"{folder / PARAMS_DIR}: not a readable params checkpoint ({type(e).__name__})") from None
    by_param = {t.param: t for t in expected.values()}
    missing, unexpected = sorted(set(by_param) - set(stored)), sorted(set(stored) - set(by_param))
    if missing or unexpected:
        parts = [f"{name} {len(keys)} parameters ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                 for name, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ConversionError(f"{folder}: the params do not fit its {CONFIG}: " + "; ".join(parts))
    for param, target in by_param.items():
        if stored[param][0] != target.shape:
            raise ConversionError(f"{folder}: {param} has shape {list(stored[param][0])}, its {CONFIG} needs "
                                  f"{list(target.shape)}")
        if stored[param][1] not in _STORED_DTYPES:
            raise ConversionError(f"{folder}: {param} has dtype {stored[param][1]}, not a float type")
    for target in expected.values():
        if target.transform is not None and target.transform not in INVERSE_TRANSFORMS:
            raise AssertionError(f"no inverse for the transform {target.transform.__name__} of {target.param}")
    return expected, stored


def _torch_tensor(target: rules.Target, array: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if target.transform is not None:
        array = INVERSE_TRANSFORMS[target.transform](array)
    return np.ascontiguousarray(array if dtype is None else array.astype(dtype))


def _torch_shape(target: rules.Target) -> tuple[int, ...]:
    if target.transform is None:
        return target.shape
    return INVERSE_TRANSFORMS[target.transform](np.broadcast_to(np.zeros((), np.uint8), target.shape)).shape


def write_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]], tensors: Iterable[np.ndarray],
                      metadata: dict[str, str]) -> None:
    """A safetensors file of the tensors ``specs`` announces (``{key: (shape, dtype)}``, in order), written as
    ``tensors`` yields them: one tensor in memory at a time, no serialized copy."""
    header, offset = {"__metadata__": metadata}, 0
    for key, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (key, (shape, dtype)), array in zip(specs.items(), tensors, strict=True):
            if array.shape != tuple(shape) or array.dtype != dtype:
                raise AssertionError(f"{key}: got {array.dtype}{list(array.shape)}, announced {dtype}{list(shape)}")
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


@dataclasses.dataclass
class _Plan:
    """One component, checked before any weight is read: its tensors, stored dtypes and upstream config."""

    component: str
    expected: dict[str, rules.Target]
    stored: dict[str, tuple[tuple[int, ...], str]]
    dtypes: Counter
    upstream: dict
    eps_changed: list[str]


def _plan_component(component: str, src: Path, config, dtype: np.dtype | None, accept_diffusers_eps: bool) -> _Plan:
    expected, stored = _plan_tensors(component, src, config)
    dtypes = Counter(dtype.name if dtype is not None else stored[t.param][1] for t in expected.values())
    upstream, eps_changed = upstream_config(component, config, dtypes.most_common(1)[0][0], accept_diffusers_eps)
    return _Plan(component, expected, stored, dtypes, upstream, eps_changed)


def _lora_updates(adapters, scale: float, plan: _Plan) -> dict[str, tuple]:
    """``{kernel param: (A, B, alpha / rank * scale)}`` for merging LoRA adapters into the UNet's kernels."""
    updates = {}
    for name, (a, b) in adapters.layers.items():
        param = f"{name}.kernel"
        if param not in plan.stored:
            raise ConversionError(f"LoRA adapter {name!r} has no linear layer of that path in the UNet")
        if plan.stored[param][0] != (a.shape[0], b.shape[1]):
            raise ConversionError(f"LoRA adapter {name!r} is {a.shape[0]}->{b.shape[1]}, the UNet's {param} has "
                                  f"shape {list(plan.stored[param][0])}: trained for another model")
        updates[param] = (a, b, adapters.alpha[name] / a.shape[1] * scale)
    return updates


def _write_component(plan: _Plan, src: Path, dst: Path, dtype: np.dtype | None,
                     updates: dict[str, tuple] | None = None) -> dict:
    groups: dict[str, dict[str, rules.Target]] = {}
    for key, target in plan.expected.items():
        groups.setdefault(_read_group(target.param), {})[key] = target
    specs = {key: (_torch_shape(target), dtype or _STORED_DTYPES[plan.stored[target.param][1]])
             for group in groups.values() for key, target in group.items()}

    def tensors():
        for group in groups.values():
            params = load_params(src, [target.param for target in group.values()])
            for target in group.values():  # each stored array is dropped once its PyTorch layout is written
                array = params.pop(target.param)
                if updates and target.param in updates:
                    array = merged_kernel(array, *updates[target.param])
                yield _torch_tensor(target, array, dtype)

    dst.mkdir()
    write_safetensors(dst / WEIGHT_FILES[plan.component], specs, tensors(), {"format": "pt"})
    (dst / CONFIG).write_text(json.dumps(plan.upstream, indent=2) + "\n")
    return {"num_tensors": len(specs), "dtypes": dict(plan.dtypes), "config": plan.upstream,
            "eps_changed_to_diffusers": plan.eps_changed}


def _read_source(src: Path) -> dict:
    """The components of a converted folder: ``{component: config}``."""
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder")
    if not (src / MANIFEST).is_file():
        hint = " (it looks like a diffusers folder: convert it with python -m convert SRC DST)" \
            if (src / "model_index.json").is_file() else ""
        raise ConversionError(f"{src}: not a converted svd_jax folder (no {MANIFEST}){hint}")
    try:
        manifest = read_manifest(src)
    except (OSError, ValueError) as e:
        raise ConversionError(str(e)) from None
    listed = manifest["components"]
    components = [c for c in COMPONENT_CONFIGS if c in listed]
    if not components:
        raise ConversionError(f"{src / MANIFEST}: lists no component ({', '.join(COMPONENT_CONFIGS)})")
    configs = {}
    for component in components:
        try:
            configs[component] = read_config(src / component, component)
        except (OSError, ValueError) as e:
            raise ConversionError(str(e)) from None
        if not (src / component / PARAMS_DIR).is_dir():
            raise ConversionError(f"{src / component}: missing its {PARAMS_DIR} checkpoint")
        try:  # a damaged folder would otherwise be exported as valid-looking weights
            verify_component(src, manifest, component)
        except (OSError, ValueError) as e:
            raise ConversionError(str(e)) from None
    return configs


def export(src, out, dtype: str | None = None, force: bool = False, accept_diffusers_eps: bool = False,
           lora=None, lora_scale: float = 1.0) -> dict:
    """Write the converted folder ``src`` as the diffusers folder ``out``; returns a summary per component and
    whether the pipeline files were written (all three components present). ``lora``: a UNet LoRA file
    (:mod:`svd_jax.lora`) merged into the exported UNet's weights with ``lora_scale``."""
    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    check_separate(src, out)
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise ConversionError(f"{out.parent}: the destination's parent folder does not exist")
    configs = _read_source(src)
    pipeline = set(configs) == set(COMPONENT_CONFIGS)
    cast = DTYPES.get(dtype)
    plans = [_plan_component(c, src / c, config, cast, accept_diffusers_eps) for c, config in configs.items()]
    updates = {}
    if lora is not None:
        if "unet" not in configs:
            raise ConversionError(f"{src} has no unet to merge the LoRA adapters into")
        try:
            adapters = read_adapters(lora)
        except (OSError, ValueError) as e:
            raise ConversionError(str(e)) from None
        updates = _lora_updates(adapters, lora_scale, next(p for p in plans if p.component == "unet"))
    try:
        with atomic_dir(out, replace=force) as tmp:
            summary = {plan.component: _write_component(plan, src / plan.component, tmp / plan.component, cast,
                                                        updates if plan.component == "unet" else None)
                       for plan in plans}
            if pipeline:
                _write_json(tmp / "model_index.json", model_index(configs["vae"]))
                _write_json(tmp / "scheduler" / "scheduler_config.json", SVD_SCHEDULER_CONFIG)
                _write_json(tmp / "feature_extractor" / "preprocessor_config.json",
                            feature_extractor_config(configs["image_encoder"]))
    except OSError as e:
        raise written_error(e, scratch_path(out), out) from None
    return {"components": summary, "pipeline": pipeline}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
