"""The VAE of the original single file (sgm names), mapped to diffusers' VAE names. Contract: see
:mod:`convert.original_clip`.

Which weights are used:

* **Encoder and ``quant_conv``** from the conditioning embedder, ``conditioner.embedders.3.encoder.{encoder,
  quant_conv}.*``: that is the encoder sgm runs to build the concat latent, in every SVD file. The
  first-stage encoder (``first_stage_model.encoder.*``, and ``first_stage_model.quant_conv.*`` in the image-decoder
  files) is never run in image-to-video and is ignored, as are the embedder's unused ``decoder.*`` and
  ``post_quant_conv.*``.
* **Decoder** from ``first_stage_model.decoder.*``: the temporal ``VideoDecoder`` (``svd*.safetensors``) or, when
  there is no ``decoder.conv_out.time_mix_conv``, the per-frame decoder plus ``first_stage_model.post_quant_conv``
  of the ``*_image_decoder`` files (diffusers ``AutoencoderKL``).

Renames (LDM -> diffusers): ``down.i.block.j`` -> ``down_blocks.i.resnets.j``; ``down.i.downsample`` ->
``down_blocks.i.downsamplers.0``; ``mid.block_{1,2}`` -> ``mid_block.resnets.{0,1}``; ``mid.attn_1.{norm,q,k,v,
proj_out}`` -> ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (1x1 conv weights squeezed to
Linear); ``up.k`` -> ``up_blocks.(n-1-k)``; ``upsample`` -> ``upsamplers.0``; ``nin_shortcut`` -> ``conv_shortcut``;
``norm_out`` -> ``conv_norm_out``. In the temporal decoder the resblock's spatial layers go under
``spatial_res_block``, ``time_stack.{in_layers.0,in_layers.2,out_layers.0,out_layers.3}`` become
``temporal_res_block.{norm1,conv1,norm2,conv2}``, ``mix_factor`` becomes ``time_mixer.mix_factor`` and
``conv_out.time_mix_conv`` becomes ``time_conv_out``.
"""

from __future__ import annotations

import dataclasses
import re

from convert.errors import ConversionError
from svd_jax.configs import VAEConfig

FIRST_STAGE = "first_stage_model."
EMBEDDER = "conditioner.embedders.3."
PREFIXES = (FIRST_STAGE, EMBEDDER)

ENCODER = EMBEDDER + "encoder.encoder."
QUANT_CONV = EMBEDDER + "encoder.quant_conv."
DECODER = FIRST_STAGE + "decoder."
POST_QUANT_CONV = FIRST_STAGE + "post_quant_conv."
TEMPORAL_MARKER = DECODER + "conv_out.time_mix_conv.weight"
# Present in the file, deliberately unused (see the module docstring).
IGNORED_PREFIXES = (FIRST_STAGE + "encoder.", FIRST_STAGE + "quant_conv.", EMBEDDER + "encoder.decoder.",
                    EMBEDDER + "encoder.post_quant_conv.")

_PARAM = r"(weight|bias)"
_RESNET_LAYERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"}
_TIME_STACK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MID_RESNETS = {"block_1": "0", "block_2": "1"}


def squeeze_1x1(w):
    """A 1x1 conv weight ``[O, I, 1, 1]`` -> a Linear weight ``[O, I]``. Any other shape is passed on unchanged,
    so that the shape check reports it against the key's name."""
    return w[:, :, 0, 0] if w.ndim == 4 and w.shape[2:] == (1, 1) else w


def present(keys: list[str]) -> bool:
    return bool(keys)


def is_temporal(keys: list[str]) -> bool:
    return TEMPORAL_MARKER in keys


def _decoder_kind(keys: list[str]) -> str:
    if not any(k.startswith(DECODER) for k in keys):
        raise ConversionError(f"original VAE: no decoder ({DECODER}*) among the {len(keys)} VAE keys")
    if not any(k.startswith(ENCODER) for k in keys):
        raise ConversionError(f"original VAE: no conditioning encoder ({ENCODER}*) among the VAE keys")
    return "temporal" if is_temporal(keys) else "image"


def default_config(keys: list[str], filename: str) -> VAEConfig:
    return VAEConfig.svd() if _decoder_kind(keys) == "temporal" else VAEConfig.svd_image_decoder()


def adapt_config(config: VAEConfig, keys: list[str]) -> VAEConfig:
    """The keys decide the decoder kind: a diffusers ``AutoencoderKLTemporalDecoder`` config also describes the
    image-decoder file's architecture (same sizes), and vice versa."""
    kind = _decoder_kind(keys)
    if kind == config.decoder:
        return config
    groups = 32 if kind == "temporal" else config.norm_num_groups
    return dataclasses.replace(config, decoder=kind, norm_num_groups=groups)


def _attention(name: str, prefix: str):
    m = re.fullmatch(rf"mid\.attn_1\.(norm|q|k|v|proj_out)\.{_PARAM}", name)
    if not m:
        return None
    layer, param = m.groups()
    squeeze = squeeze_1x1 if layer != "norm" and param == "weight" else None
    return f"{prefix}mid_block.attentions.0.{_ATTENTION[layer]}.{param}", squeeze


def _resnet_layer(rest: str, temporal: bool):
    """``norm1.weight`` / ``time_stack.in_layers.0.bias`` / ``mix_factor`` inside one resblock -> diffusers name."""
    if m := re.fullmatch(rf"(norm1|conv1|norm2|conv2|nin_shortcut)\.{_PARAM}", rest):
        inner = f"{_RESNET_LAYERS[m.group(1)]}.{m.group(2)}"
        return f"spatial_res_block.{inner}" if temporal else inner
    if not temporal:
        return None
    if m := re.fullmatch(rf"time_stack\.(in_layers\.0|in_layers\.2|out_layers\.0|out_layers\.3)\.{_PARAM}", rest):
        return f"temporal_res_block.{_TIME_STACK[m.group(1)]}.{m.group(2)}"
    if rest == "mix_factor":
        return "time_mixer.mix_factor"
    return None


def _encoder_key(name: str):
    """A key below ``...encoder.encoder.`` -> ``(diffusers key, transform)`` or None."""
    if m := re.fullmatch(rf"(conv_in|conv_out)\.{_PARAM}", name):
        return f"encoder.{name}", None
    if m := re.fullmatch(rf"norm_out\.{_PARAM}", name):
        return f"encoder.conv_norm_out.{m.group(1)}", None
    if m := re.fullmatch(rf"down\.(\d+)\.downsample\.conv\.{_PARAM}", name):
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}", None
    if (m := re.fullmatch(r"down\.(\d+)\.block\.(\d+)\.(.+)", name)) and (inner := _resnet_layer(m.group(3), False)):
        return f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{inner}", None
    if (m := re.fullmatch(r"mid\.(block_1|block_2)\.(.+)", name)) and (inner := _resnet_layer(m.group(2), False)):
        return f"encoder.mid_block.resnets.{_MID_RESNETS[m.group(1)]}.{inner}", None
    return _attention(name, "encoder.")


def _decoder_key(name: str, temporal: bool, num_blocks: int):
    """A key below ``first_stage_model.decoder.`` -> ``(diffusers key, transform)`` or None."""
    if re.fullmatch(rf"(conv_in|conv_out)\.{_PARAM}", name):
        return f"decoder.{name}", None
    if m := re.fullmatch(rf"norm_out\.{_PARAM}", name):
        return f"decoder.conv_norm_out.{m.group(1)}", None
    if temporal and (m := re.fullmatch(rf"conv_out\.time_mix_conv\.{_PARAM}", name)):
        return f"decoder.time_conv_out.{m.group(1)}", None
    if m := re.fullmatch(rf"up\.(\d+)\.upsample\.conv\.{_PARAM}", name):
        return f"decoder.up_blocks.{num_blocks - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}", None
    if (m := re.fullmatch(r"up\.(\d+)\.block\.(\d+)\.(.+)", name)) and (inner := _resnet_layer(m.group(3), temporal)):
        return f"decoder.up_blocks.{num_blocks - 1 - int(m.group(1))}.resnets.{m.group(2)}.{inner}", None
    if (m := re.fullmatch(r"mid\.(block_1|block_2)\.(.+)", name)) and (inner := _resnet_layer(m.group(2), temporal)):
        return f"decoder.mid_block.resnets.{_MID_RESNETS[m.group(1)]}.{inner}", None
    return _attention(name, "decoder.")


def rename(keys: list[str], config: VAEConfig):
    """Map the encoder, ``quant_conv``, decoder (and ``post_quant_conv`` for the image decoder); list the rest of
    the known unused keys as ignored. Anything else is left out, so the caller reports it as unrecognised."""
    temporal = config.decoder == "temporal"
    if temporal != is_temporal(keys):
        raise ConversionError(f"original VAE: the file holds a {'temporal' if is_temporal(keys) else 'image'} "
                              f"decoder, the config says {config.decoder!r}")
    num_blocks = len(config.block_out_channels)
    mapping, ignored = {}, []
    for key in keys:
        target = None
        if key.startswith(ENCODER):
            target = _encoder_key(key[len(ENCODER):])
        elif m := re.fullmatch(rf"{re.escape(QUANT_CONV)}{_PARAM}", key):
            target = f"quant_conv.{m.group(1)}", None
        elif key.startswith(DECODER):
            target = _decoder_key(key[len(DECODER):], temporal, num_blocks)
        elif not temporal and (m := re.fullmatch(rf"{re.escape(POST_QUANT_CONV)}{_PARAM}", key)):
            target = f"post_quant_conv.{m.group(1)}", None
        elif key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        if target is not None:
            if target[0] in mapping:
                raise ConversionError(f"original VAE: {key} and {mapping[target[0]][0]} both map to {target[0]}")
            mapping[target[0]] = (key, target[1])
    return mapping, ignored
