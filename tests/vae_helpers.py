"""Helpers for the VAE tests: tiny diffusers VAEs, filling one NNX block from its PyTorch twin, and the original
single file's key names written out from the reference's rename rules (section 5.3), independently of the
converter's own mapper."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from flax import nnx

from convert import rules
from svd_jax.checkpoint import path_key
from svd_jax.components import abstract_model


def diffusers_vae(decoder: str, block_out_channels, layers_per_block: int, **extra):
    """A randomly initialised diffusers VAE (``decoder`` "temporal" or "image")."""
    n = len(block_out_channels)
    kwargs = dict(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                  down_block_types=("DownEncoderBlock2D",) * n, **extra)
    if decoder == "temporal":
        return AutoencoderKLTemporalDecoder(**kwargs)
    return AutoencoderKL(up_block_types=("UpDecoderBlock2D",) * n, **kwargs)


@functools.lru_cache(maxsize=None)
def real_size_expected_keys(config) -> dict:
    """``convert.rules.expected_keys`` of the abstract VAE for ``config`` (cached: the real size takes a while)."""
    return rules.expected_keys(abstract_model("vae", config))


def load_block(make_block, torch_block: torch.nn.Module):
    """Build the NNX block ``make_block()`` abstractly and fill it from ``torch_block``'s state dict through the
    converter's rule engine (strict: a missing or extra key fails)."""
    block = nnx.eval_shape(make_block)
    state = {k: v.detach().numpy() for k, v in torch_block.state_dict().items()}
    expected = rules.expected_keys(block)
    rules.plan("block", expected, {k: tuple(v.shape) for k, v in state.items()})
    params = rules.fill(expected, state.__getitem__)
    graphdef, variables, rest = nnx.split(block, nnx.Param, ...)
    for path, var in nnx.to_flat_state(variables):
        var.set_value(jnp.asarray(params[path_key(path)]))
    return nnx.merge(graphdef, variables, rest)


def jitted(module, method: str | None = None, static_argnums=()):
    """``module(*args)`` (or ``module.method(*args)``) compiled as one function of its parameters."""
    graphdef, state = nnx.split(module)

    def run(state, *args):
        m = nnx.merge(graphdef, state)
        return (getattr(m, method) if method else m)(*args)

    compiled = jax.jit(run, static_argnums=tuple(i + 1 for i in static_argnums))
    return lambda *args: compiled(state, *args)


# ---- the original single file's names ------------------------------------------------------------------------
# diffusers name -> sgm name, one row per rule of reference section 5.3 (VAE). "{up}" is the sgm decoder level of
# diffusers' up block index "lvl": up.k -> up_blocks.(n-1-k). Rows are tried in order; the first full match wins.
ENC = "conditioner.embedders.3.encoder.encoder."
DEC = "first_stage_model.decoder."
_RESNET = [(r"conv_shortcut\.(?P<p>.+)", "nin_shortcut.{p}"), (r"(?P<rest>(norm1|conv1|norm2|conv2)\..+)", "{rest}")]
_TEMPORAL_RESNET = [
    (r"spatial_res_block\.conv_shortcut\.(?P<p>.+)", "nin_shortcut.{p}"),
    (r"spatial_res_block\.(?P<rest>(norm1|conv1|norm2|conv2)\..+)", "{rest}"),
    (r"temporal_res_block\.norm1\.(?P<p>.+)", "time_stack.in_layers.0.{p}"),
    (r"temporal_res_block\.conv1\.(?P<p>.+)", "time_stack.in_layers.2.{p}"),
    (r"temporal_res_block\.norm2\.(?P<p>.+)", "time_stack.out_layers.0.{p}"),
    (r"temporal_res_block\.conv2\.(?P<p>.+)", "time_stack.out_layers.3.{p}"),
    (r"time_mixer\.mix_factor", "mix_factor"),
]
_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), (r"to_out\.0", "proj_out")]


def _rows(temporal: bool):
    rows = [
        (r"quant_conv\.(?P<p>.+)", "conditioner.embedders.3.encoder.quant_conv.{p}"),
        (r"post_quant_conv\.(?P<p>.+)", "first_stage_model.post_quant_conv.{p}"),
        (r"encoder\.conv_in\.(?P<p>.+)", ENC + "conv_in.{p}"),
        (r"encoder\.conv_out\.(?P<p>.+)", ENC + "conv_out.{p}"),
        (r"encoder\.conv_norm_out\.(?P<p>.+)", ENC + "norm_out.{p}"),
        (r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.(?P<p>.+)", ENC + "down.{i}.downsample.conv.{p}"),
        (r"decoder\.conv_in\.(?P<p>.+)", DEC + "conv_in.{p}"),
        (r"decoder\.conv_out\.(?P<p>.+)", DEC + "conv_out.{p}"),
        (r"decoder\.time_conv_out\.(?P<p>.+)", DEC + "conv_out.time_mix_conv.{p}"),
        (r"decoder\.conv_norm_out\.(?P<p>.+)", DEC + "norm_out.{p}"),
        (r"decoder\.up_blocks\.(?P<lvl>\d+)\.upsamplers\.0\.conv\.(?P<p>.+)", DEC + "up.{up}.upsample.conv.{p}"),
    ]
    for side, prefix in (("encoder", ENC), ("decoder", DEC)):
        for src, dst in _ATTENTION:
            rows.append((rf"{side}\.mid_block\.attentions\.0\.{src}\.(?P<p>.+)", prefix + f"mid.attn_1.{dst}.{{p}}"))
    for src, dst in _RESNET:
        rows.append((rf"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.{src}",
                     ENC + "down.{i}.block.{j}." + dst))
        for r, block in (("0", "block_1"), ("1", "block_2")):
            rows.append((rf"encoder\.mid_block\.resnets\.{r}\.{src}", ENC + f"mid.{block}." + dst))
    for src, dst in (_TEMPORAL_RESNET if temporal else _RESNET):
        rows.append((rf"decoder\.up_blocks\.(?P<lvl>\d+)\.resnets\.(?P<j>\d+)\.{src}",
                     DEC + "up.{up}.block.{j}." + dst))
        for r, block in (("0", "block_1"), ("1", "block_2")):
            rows.append((rf"decoder\.mid_block\.resnets\.{r}\.{src}", DEC + f"mid.{block}." + dst))
    return rows


def original_name(key: str, num_blocks: int, temporal: bool) -> str:
    """The original single file's name of a diffusers VAE key."""
    for pattern, template in _rows(temporal):
        if m := re.fullmatch(pattern, key):
            groups = m.groupdict()
            up = num_blocks - 1 - int(groups["lvl"]) if "lvl" in groups else None
            return template.format(**groups, up=up)
    raise KeyError(f"no original name for {key}")


def unsqueeze_attention(key: str, array):
    """The original stores the mid-attention projections as 1x1 convs."""
    if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key):
        return array[:, :, None, None]
    return array


def original_tensors(state_dict: dict, num_blocks: int, temporal: bool) -> dict[str, np.ndarray]:
    """A diffusers VAE state dict under the original file's names and layouts (numpy)."""
    return {original_name(k, num_blocks, temporal): np.ascontiguousarray(unsqueeze_attention(k, np.asarray(v)))
            for k, v in state_dict.items()}


def original_shapes(shapes: dict, num_blocks: int, temporal: bool) -> dict[str, tuple[int, ...]]:
    """The same for ``{diffusers key: shape}`` (a meta-device model's state dict)."""
    return {original_name(k, num_blocks, temporal): unsqueeze_attention(k, np.broadcast_to(np.float32(0), s)).shape
            for k, s in shapes.items()}


FIRST_STAGE_ENCODER = "first_stage_model.encoder."
EMBEDDER_DECODER = "conditioner.embedders.3.encoder.decoder."
EMBEDDER_POST_QUANT_CONV = "conditioner.embedders.3.encoder.post_quant_conv."


def _move(tensors: dict, old: str, new: str) -> dict:
    return {new + k[len(old):]: v for k, v in tensors.items() if k.startswith(old)}


def unused_parts(other: dict, image_decoder: bool) -> dict:
    """The parts of the file the converter must not use, taken from ``other``, another image VAE's tensors (or
    shapes) under the original names: the first-stage encoder (plus its quant_conv in the image-decoder file) and
    the embedder's decoder and post_quant_conv."""
    parts = {**_move(other, ENC, FIRST_STAGE_ENCODER), **_move(other, DEC, EMBEDDER_DECODER),
             **_move(other, "first_stage_model.post_quant_conv.", EMBEDDER_POST_QUANT_CONV)}
    if image_decoder:
        parts.update(_move(other, "conditioner.embedders.3.encoder.quant_conv.", "first_stage_model.quant_conv."))
    return parts


@functools.lru_cache(maxsize=None)
def real_size_original_shapes(image_decoder: bool) -> dict:
    """Key -> shape of a real-size original file's VAE part, built from meta-device diffusers models."""
    kwargs = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4)
    with torch.device("meta"):
        image = AutoencoderKL(up_block_types=("UpDecoderBlock2D",) * 4, **kwargs)
        used = image if image_decoder else AutoencoderKLTemporalDecoder(**kwargs)

    def shapes(model, temporal):
        return original_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, 4, temporal)

    source = shapes(used, temporal=not image_decoder)
    source.update(unused_parts(shapes(image, temporal=False), image_decoder))
    return source
