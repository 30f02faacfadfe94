"""The spatio-temporal UNet of the original (sgm) single file, ``model.diffusion_model.*``, mapped to diffusers names.

sgm numbers its blocks as flat lists (``input_blocks.i.k``, ``middle_block.k``, ``output_blocks.i.k``); the
block index tables here follow sgm's construction (``VideoUNet``) for the config's per-level layer counts. Inside a
resnet the sub-modules are renamed (``in_layers.2`` -> ``spatial_res_block.conv1``, ``time_stack.*`` ->
``temporal_res_block.*``); inside a transformer only ``time_stack.N`` -> ``temporal_transformer_blocks.N`` and
``time_pos_embed.0/2`` -> ``time_pos_embed.linear_1/2`` change. No tensor needs reshaping.

The original numerics differ from diffusers' in one place: every resnet GroupNorm uses eps 1e-5
(:meth:`UNetConfig.with_original_norm_eps`), so a converted original file reproduces the original model.

SVD (14 frames) and SVD-XT (25 frames, also XT-1.1) have identical architectures and weights layouts; the preset
is chosen from the file name (``svd_xt*`` -> SVD-XT, anything else -> SVD) and only sets the default frame count.
``--config DIR`` (a diffusers ``unet/config.json``) overrides it, with the original norm epsilons applied.
"""

from __future__ import annotations

import re

from svd_jax.configs import UNetConfig

PREFIX = "model.diffusion_model."
PREFIXES = (PREFIX,)

_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_PARAM = re.compile(r"(.+)\.(weight|bias|mix_factor)")
_TRANSFORMER_MODULE = re.compile(
    r"norm|proj_in|proj_out|time_mixer|time_pos_embed\.[02]|(transformer_blocks|time_stack)\.\d+\.[\w.]+")


def present(keys: list[str]) -> bool:
    return any(k.startswith(PREFIX) for k in keys)


def default_config(keys: list[str], filename: str) -> UNetConfig:
    """SVD-XT if the file name says ``xt`` (``svd_xt.safetensors``, ``svd_xt_1_1.safetensors``), else SVD."""
    preset = UNetConfig.svd_xt() if "xt" in filename.lower() else UNetConfig.svd()
    return preset.with_original_norm_eps()


def adapt_config(config: UNetConfig, keys: list[str]) -> UNetConfig:
    return config.with_original_norm_eps()


def block_table(config: UNetConfig) -> dict[str, tuple[str, str]]:
    """``{sgm module prefix: (diffusers module prefix, kind)}``, kind one of resnet, transformer, plain."""
    table: dict[str, tuple[str, str]] = {}
    n = len(config.block_out_channels)
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(config.down_block_types):
        for j in range(config.layers_per_block[level]):
            table[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", "resnet")
            if block_type.startswith("CrossAttn"):
                table[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", "transformer")
            index += 1
        if level < n - 1:
            table[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", "plain")
            index += 1
    table["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    table["middle_block.1"] = ("mid_block.attentions.0", "transformer")
    table["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    index = 0
    for i, block_type in enumerate(config.up_block_types):
        layers = config.layers_per_block[n - 1 - i] + 1
        for j in range(layers):
            table[f"output_blocks.{index}.0"] = (f"up_blocks.{i}.resnets.{j}", "resnet")
            position = 1
            if block_type.startswith("CrossAttn"):
                table[f"output_blocks.{index}.1"] = (f"up_blocks.{i}.attentions.{j}", "transformer")
                position = 2
            if j == layers - 1 and i < n - 1:
                table[f"output_blocks.{index}.{position}.conv"] = (f"up_blocks.{i}.upsamplers.0.conv", "plain")
            index += 1
    for sgm, diffusers in _TOP.items():
        table[sgm] = (diffusers, "plain")
    return table


def _resnet_module(module: str) -> str | None:
    if module == "time_mixer":
        return module
    if module.startswith("time_stack."):
        part = _RESNET_PARTS.get(module[len("time_stack."):])
        return None if part is None or part == "conv_shortcut" else f"temporal_res_block.{part}"
    part = _RESNET_PARTS.get(module)
    return None if part is None else f"spatial_res_block.{part}"


def _transformer_module(module: str) -> str | None:
    if not _TRANSFORMER_MODULE.fullmatch(module):
        return None
    if module.startswith("time_stack."):
        return "temporal_transformer_blocks." + module[len("time_stack."):]
    if module.startswith("time_pos_embed."):
        return "time_pos_embed.linear_" + ("1" if module.endswith("0") else "2")
    return module


def _split_block(name: str, table: dict) -> tuple[str, str] | None:
    """``input_blocks.1.0.in_layers.2`` -> (``input_blocks.1.0``, ``in_layers.2``) for the longest table prefix."""
    parts = name.split(".")
    for cut in range(min(len(parts), 4), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return prefix, ".".join(parts[cut:])
    return None


def rename(keys: list[str], config: UNetConfig):
    table = block_table(config)
    mapping = {}
    for key in keys:
        match = _PARAM.fullmatch(key[len(PREFIX):])
        if match is None:
            continue
        split = _split_block(match.group(1), table)
        if split is None:
            continue
        (sgm_block, module), param = split, match.group(2)
        target, kind = table[sgm_block]
        if kind == "plain":
            inner = "" if module == "" else None
        elif kind == "resnet":
            inner = _resnet_module(module)
        else:
            inner = _transformer_module(module)
        if inner is None:
            continue
        mapping[".".join(p for p in (target, inner, param) if p)] = (key, None)
    return mapping, []
