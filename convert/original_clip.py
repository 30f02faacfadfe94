"""The OpenCLIP ViT-H/14 vision tower of the original SVD file, mapped to transformers' CLIP names.

Contract shared by the ``original_*`` mappers (used by :mod:`convert.layouts`):

* ``PREFIXES``: the key prefixes this component owns in the single file.
* ``present(keys)``: whether the owned keys hold this component.
* ``default_config(keys, filename)``: the real model's config, when ``--config`` gives none.
* ``adapt_config(config, keys)``: a ``--config`` config adjusted to this source's numerics.
* ``rename(keys, config)``: ``({canonical key: (source key, transform)}, [ignored source keys])``.
"""

from __future__ import annotations

import re

from svd_jax.configs import CLIPVisionConfig

MODEL = "conditioner.embedders.0.open_clip.model."
VISUAL = MODEL + "visual."
PREFIXES = (MODEL,)
# The text tower's modules were deleted upstream, but these parameters of the CLIP model stayed in the file.
TEXT_LEFTOVERS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                  "text_projection", "logit_scale", "attn_mask")

_TOP = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_LAYER = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")


def present(keys: list[str]) -> bool:
    return any(k.startswith(VISUAL) for k in keys)


def default_config(keys: list[str], filename: str) -> CLIPVisionConfig:
    return CLIPVisionConfig.vit_h_14()


def adapt_config(config: CLIPVisionConfig, keys: list[str]) -> CLIPVisionConfig:
    return config


def _qkv_part(index: int):
    """OpenCLIP stores q, k, v stacked on dim 0 of ``in_proj_*``; take the ``index``-th third."""
    def take(w):
        n = w.shape[0] // 3
        return w[index * n:(index + 1) * n]
    return take


def _transpose(w):
    return w.T


def rename(keys: list[str], config: CLIPVisionConfig):
    mapping, ignored = {}, []
    for key in keys:
        if not key.startswith(VISUAL):
            if key[len(MODEL):] in TEXT_LEFTOVERS:
                ignored.append(key)
            continue
        name = key[len(VISUAL):]
        if name in _TOP:
            mapping[_TOP[name]] = (key, None)
        elif name == "proj":  # [width, projection_dim] used as x @ proj; transformers stores [out, in]
            mapping["visual_projection.weight"] = (key, _transpose)
        elif m := _IN_PROJ.fullmatch(name):
            layer, kind = m.groups()
            for index, part in enumerate(("q_proj", "k_proj", "v_proj")):
                mapping[f"vision_model.encoder.layers.{layer}.self_attn.{part}.{kind}"] = (key, _qkv_part(index))
        elif (m := _RESBLOCK.fullmatch(name)) and m.group(2) in _LAYER:
            layer, module, kind = m.groups()
            mapping[f"vision_model.encoder.layers.{layer}.{_LAYER[module]}.{kind}"] = (key, None)
    return mapping, ignored
