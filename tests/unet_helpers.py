"""Helpers for the UNet parity tests: tiny diffusers UNets, NNX blocks filled by the converter's rules, and the
original (sgm) key names written out as data from the reference (section 5.3), independent of the converter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from convert import rules
from svd_jax.checkpoint import path_key

DOWN_CROSS, DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
UP_CROSS, UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"


def tiny_unet_config(channels, heads, layers, down_types, cross_dim=24, transformer_layers=1, add_dim=8,
                     num_frames=3) -> dict:
    """A diffusers ``unet/config.json`` dict; up block types mirror the down block types."""
    up_types = [UP_CROSS if t == DOWN_CROSS else UP for t in reversed(down_types)]
    return {
        "_class_name": "UNetSpatioTemporalConditionModel", "sample_size": 8, "in_channels": 8, "out_channels": 4,
        "down_block_types": list(down_types), "up_block_types": up_types, "block_out_channels": list(channels),
        "addition_time_embed_dim": add_dim, "projection_class_embeddings_input_dim": 3 * add_dim,
        "layers_per_block": layers, "cross_attention_dim": cross_dim,
        "transformer_layers_per_block": transformer_layers, "num_attention_heads": list(heads),
        "num_frames": num_frames,
    }


def unet_inputs(batch, frames, height, width, context_dim, context_tokens=2, seed=0):
    """Random torch inputs in diffusers' layout: sample ``[B, F, 8, h, w]``, c_noise-like timesteps,
    ``[fps-1, motion bucket, aug]`` ids."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, frames, 8, height, width, generator=g)
    timestep = torch.rand(batch, generator=g) * 3 - 1.5
    context = torch.randn(batch, context_tokens, context_dim, generator=g)
    ids = torch.stack([torch.randint(3, 30, (batch,), generator=g).float(),
                       torch.randint(1, 255, (batch,), generator=g).float(),
                       torch.rand(batch, generator=g) * 0.1], dim=1)
    return sample, timestep, context, ids


def to_jax_inputs(sample, timestep, context, ids):
    return (sample.permute(0, 1, 3, 4, 2).numpy(), timestep.numpy(), context.numpy(), ids.numpy())


def torch_unet_output(model, sample, timestep, context, ids) -> np.ndarray:
    """diffusers' output, channels last ``[B, F, h, w, 4]``."""
    with torch.no_grad():
        out = model(sample, timestep, encoder_hidden_states=context, added_time_ids=ids).sample
    return out.permute(0, 1, 3, 4, 2).numpy()


def jitted_call(model):
    """``f(*inputs)`` running ``model`` under one ``jax.jit`` with its parameters as arguments, and a counter of
    how often it was traced."""
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def run(state, *inputs):
        traces.append(1)
        return nnx.merge(graphdef, state)(*inputs)

    return (lambda *inputs: run(state, *inputs)), traces


def filled_block(build, torch_module):
    """An NNX block built by ``build(rngs)`` whose parameters are the torch module's, placed by the converter's
    own rule engine (``convert.rules``): every torch key must be consumed and every NNX parameter filled."""
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    expected = rules.expected_keys(abstract)
    source = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    assert set(source) == set(expected), (sorted(set(source) - set(expected)), sorted(set(expected) - set(source)))
    params = rules.fill(expected, source.__getitem__)
    graphdef, state = nnx.split(abstract)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(params[path_key(path)]))
    return nnx.merge(graphdef, state)


def torch_group_norm_eps(model: torch.nn.Module) -> dict[str, float]:
    return {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}


def nnx_group_norm_eps(model) -> dict[str, float]:
    from svd_jax.layers import GroupNorm
    return {path_key(path): node.eps for path, node in nnx.iter_graph(model) if isinstance(node, GroupNorm)}


# ---- the original (sgm) names, from the reference's section 5.3, as data (diffusers -> sgm) ----

SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
}
SGM_RESNET = {
    "spatial_res_block.norm1": "in_layers.0",
    "spatial_res_block.conv1": "in_layers.2",
    "spatial_res_block.time_emb_proj": "emb_layers.1",
    "spatial_res_block.norm2": "out_layers.0",
    "spatial_res_block.conv2": "out_layers.3",
    "spatial_res_block.conv_shortcut": "skip_connection",
    "temporal_res_block.norm1": "time_stack.in_layers.0",
    "temporal_res_block.conv1": "time_stack.in_layers.2",
    "temporal_res_block.time_emb_proj": "time_stack.emb_layers.1",
    "temporal_res_block.norm2": "time_stack.out_layers.0",
    "temporal_res_block.conv2": "time_stack.out_layers.3",
    "time_mixer": "time_mixer",
}
SGM_TRANSFORMER = {
    "temporal_transformer_blocks": "time_stack",
    "time_pos_embed.linear_1": "time_pos_embed.0",
    "time_pos_embed.linear_2": "time_pos_embed.2",
}


def sgm_block_names(levels: int, layers: int, down_has_attention: list[bool]) -> dict[str, str]:
    """diffusers block prefix -> sgm block prefix for ``layers`` resnets per down level (sgm's
    ``num_res_blocks``): input block ``1 + level*(layers+1) + j``, downsample at ``j = layers``; output block
    ``i*(layers+1) + j``, its upsample conv after the resnet (and transformer, if any) of the last one."""
    names = {}
    for level in range(levels):
        for j in range(layers):
            i = 1 + level * (layers + 1) + j
            names[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{i}.0"
            names[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{i}.1"
        names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{1 + level * (layers + 1) + layers}.0.op"
    for up in range(levels):
        attention = down_has_attention[levels - 1 - up]
        for j in range(layers + 1):
            i = up * (layers + 1) + j
            names[f"up_blocks.{up}.resnets.{j}"] = f"output_blocks.{i}.0"
            names[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{i}.1"
        last = up * (layers + 1) + layers
        names[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{last}.{2 if attention else 1}.conv"
    names.update(SGM_TOP)
    return names


def to_sgm_key(key: str, blocks: dict[str, str]) -> str:
    """A diffusers UNet key in the original file's naming (``model.diffusion_model.`` prefix)."""
    module, _, param = key.rpartition(".")
    block = max((b for b in blocks if module == b or module.startswith(b + ".")), key=len)
    inner = module[len(block) + 1:]
    if ".resnets." in f".{block}":
        inner = SGM_RESNET[inner]
    elif ".attentions." in f".{block}":
        for old, new in SGM_TRANSFORMER.items():
            if inner == old or inner.startswith(old + "."):
                inner = new + inner[len(old):]
                break
    return "model.diffusion_model." + ".".join(p for p in (blocks[block], inner, param) if p)
