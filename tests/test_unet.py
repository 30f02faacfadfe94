"""The whole UNet through the real converter against diffusers ``UNetSpatioTemporalConditionModel``, float32,
every parameter random: diffusers folders (fp32 and ``.fp16``), the original single-file layout, full-size key
coverage, jit, and input errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel as TorchUNet
from safetensors.torch import save_file

import svd_jax
from convert import original_unet, rules
from parity import convert_inprocess, max_rel_err, randomize, write_config_dir
from svd_jax.configs import UNetConfig
from svd_jax.components import abstract_model
from unet_helpers import (DOWN, DOWN_CROSS, UP, UP_CROSS, jitted_call, nnx_group_norm_eps, sgm_block_names,
                          tiny_unet_config, to_jax_inputs, to_sgm_key, torch_group_norm_eps, torch_unet_output,
                          unet_inputs)

TWO_LEVELS = tiny_unet_config((32, 64), (2, 4), 2, [DOWN_CROSS, DOWN])
# per-level settings that differ, so that their reversal on the up path matters
THREE_LEVELS = tiny_unet_config((32, 64, 96), (2, 4, 3), 1, [DOWN_CROSS, DOWN, DOWN], transformer_layers=[2, 1, 1],
                                cross_dim=16)


def _torch_unet(config, seed):
    model = randomize(TorchUNet(**{k: v for k, v in config.items() if not k.startswith("_")}), seed=seed)
    # conv_in scaled down: the first GroupNorms then see a variance comparable to their eps, so eps matters
    with torch.no_grad():
        model.conv_in.weight.mul_(1e-3)
        model.conv_in.bias.mul_(1e-3)
    return model


def _load_unet(dst):
    return svd_jax.load(dst, policy=svd_jax.Policy.float32()).unet


def test_two_levels_parity_one_trace(tmp_path):
    torch_model = _torch_unet(TWO_LEVELS, seed=1)
    torch_model.save_pretrained(tmp_path / "src" / "unet")
    convert_inprocess(tmp_path / "src", tmp_path / "dst", "--no-hash")
    unet = _load_unet(tmp_path / "dst")
    assert nnx_group_norm_eps(unet) == torch_group_norm_eps(torch_model)

    run, traces = jitted_call(unet)
    for seed in (2, 3):  # two calls with new values: one trace
        inputs = unet_inputs(2, 3, 8, 12, 24, seed=seed)
        assert max_rel_err(run(*to_jax_inputs(*inputs)), torch_unet_output(torch_model, *inputs)) <= 1e-4
    assert len(traces) == 1


def test_three_levels_fp16_folder_parity(tmp_path):
    torch_model = _torch_unet(THREE_LEVELS, seed=5).half()
    torch_model.save_pretrained(tmp_path / "unet", variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    convert_inprocess(tmp_path / "unet", tmp_path / "dst", "--no-hash")
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert set(manifest["components"]["unet"]["dtypes"]) == {"float16"}
    unet = _load_unet(tmp_path / "dst")
    torch_model = torch_model.float()  # the same (fp16-rounded) numbers, computed in float32
    inputs = unet_inputs(2, 5, 8, 12, 16, seed=6)
    run, _ = jitted_call(unet)
    assert max_rel_err(run(*to_jax_inputs(*inputs)), torch_unet_output(torch_model, *inputs)) <= 1e-4


def test_original_single_file_parity(tmp_path):
    """The original layout, written by the test's own reading of the reference's rename rules, converts to the
    model diffusers computes with the original numerics (GroupNorm eps 1e-5 in every resnet)."""
    config = tiny_unet_config((32, 64), (2, 4), 1, [DOWN_CROSS, DOWN], num_frames=14)
    torch_model = _torch_unet(config, seed=7)
    blocks = sgm_block_names(2, 1, [True, False])
    tensors = {to_sgm_key(k, blocks): v.contiguous() for k, v in torch_model.state_dict().items()}
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in tensors  # the upsample conv of a plain level
    save_file(tensors, tmp_path / "svd.safetensors")
    config_dir = write_config_dir(tmp_path / "cfg", "unet", config)
    convert_inprocess(tmp_path / "svd.safetensors", tmp_path / "dst", "--config", str(config_dir), "--no-hash")
    unet = _load_unet(tmp_path / "dst")

    inputs = unet_inputs(2, 1, 8, 12, 24, seed=8)  # a single frame: the temporal layers see one frame
    diffusers_numerics = torch_unet_output(torch_model, *inputs)
    for name, module in torch_model.named_modules():
        if isinstance(module, torch.nn.GroupNorm) and ".resnets." in name:
            module.eps = 1e-5
    original_numerics = torch_unet_output(torch_model, *inputs)
    assert nnx_group_norm_eps(unet) == torch_group_norm_eps(torch_model)
    run, _ = jitted_call(unet)
    actual = run(*to_jax_inputs(*inputs))
    assert max_rel_err(actual, original_numerics) <= 1e-4
    assert max_rel_err(actual, diffusers_numerics) > 1e-3  # the eps difference is visible to this test


# stabilityai/stable-video-diffusion-img2vid-xt unet/config.json (reference, section 1.1)
SVD_XT_HUB_CONFIG = {
    "_class_name": "UNetSpatioTemporalConditionModel", "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": [DOWN_CROSS, DOWN_CROSS, DOWN_CROSS, DOWN], "in_channels": 8, "layers_per_block": 2,
    "num_attention_heads": [5, 10, 20, 20], "num_frames": 25, "out_channels": 4,
    "projection_class_embeddings_input_dim": 768, "sample_size": 96, "transformer_layers_per_block": 1,
    "up_block_types": [UP, UP_CROSS, UP_CROSS, UP_CROSS],
}


def test_svd_xt_maps_key_for_key():
    """The real SVD-XT config: every key of diffusers' model (meta device) and of the original layout maps."""
    hub_config = SVD_XT_HUB_CONFIG
    with torch.device("meta"):
        torch_model = TorchUNet(**{k: v for k, v in hub_config.items() if not k.startswith("_")})
    source = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    config = UNetConfig.from_diffusers_config(hub_config)
    assert config == UNetConfig.svd_xt()
    abstract = abstract_model("unet", config)
    expected = rules.expected_keys(abstract)
    assert rules.plan("unet", expected, source) == []
    assert set(source) == set(expected)
    assert sum(np.prod(s) for s in source.values()) == 1_524_623_082
    assert nnx_group_norm_eps(abstract) == torch_group_norm_eps(torch_model)

    blocks = sgm_block_names(4, 2, [True, True, True, False])
    original = {to_sgm_key(k, blocks): k for k in source}
    # spot checks against the reference's level-by-level layout (section 1.2)
    for sgm in ("input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.11.0.time_stack.in_layers.2.weight", "middle_block.1.time_stack.0.ff_in.net.2.bias",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.bias",
                "output_blocks.11.1.time_pos_embed.2.weight", "label_emb.0.2.bias", "out.2.weight"):
        assert "model.diffusion_model." + sgm in original
    mapping, ignored = original_unet.rename(list(original), original_unet.default_config(list(original), "svd_xt.safetensors"))
    assert ignored == []
    assert {canonical: src for canonical, (src, fn) in mapping.items()} == {v: k for k, v in original.items()}


@pytest.mark.parametrize("filename,frames", [("svd.safetensors", 14), ("svd_xt.safetensors", 25),
                                             ("svd_xt_1_1.safetensors", 25), ("svd_image_decoder.safetensors", 14),
                                             ("SVD_XT_image_decoder.safetensors", 25)])
def test_original_presets(filename, frames):
    config = original_unet.default_config(["model.diffusion_model.out.2.weight"], filename)
    assert config.num_frames == frames
    assert set(config.down_resnet_eps) | set(config.up_resnet_eps) | {config.mid_resnet_eps} == {1e-5}
    adapted = original_unet.adapt_config(UNetConfig.from_diffusers_config(TWO_LEVELS), [])
    assert set(adapted.down_resnet_eps) | set(adapted.up_resnet_eps) == {1e-5}


def test_diffusers_eps_tables():
    config = UNetConfig.svd_xt()
    assert config.down_resnet_eps == (1e-6, 1e-6, 1e-6, 1e-5) and config.mid_resnet_eps == 1e-5
    assert config.up_resnet_eps == (1e-6,) * 4
    assert (config.transformer_norm_eps, config.out_norm_eps, config.layer_norm_eps) == (1e-6, 1e-5, 1e-5)


@pytest.fixture(scope="module")
def abstract_unet():
    """Shapes only: input validation runs before any computation."""
    return abstract_model("unet", UNetConfig.from_diffusers_config(TWO_LEVELS))


def _good(batch=2, frames=3):
    return (np.zeros((batch, frames, 8, 12, 8), np.float32), np.zeros((batch,), np.float32),
            np.zeros((batch, 1, 24), np.float32), np.zeros((batch, 3), np.float32))


@pytest.mark.parametrize("index,value,message", [
    (0, np.zeros((2, 3, 8, 12, 4), np.float32), "sample has 4 channels, the model takes 8"),
    (0, np.zeros((6, 8, 12, 8), np.float32), r"sample must be \[B, F, h, w, 8\]"),
    (0, np.zeros((2, 3, 8, 9, 8), np.float32), "latent size 8x9 must be a multiple of 2"),
    (1, np.zeros((6,), np.float32), r"timestep must be a scalar or \[2\]"),
    (2, np.zeros((6, 1, 24), np.float32), "one context per video, not per frame"),
    (2, np.zeros((2, 1, 32), np.float32), r"encoder_hidden_states must be \[2, L, 24\]"),
    (3, np.zeros((6, 3), np.float32), r"added_time_ids must be \[2, 3\]"),
])
def test_bad_inputs(abstract_unet, index, value, message):
    inputs = list(_good())
    inputs[index] = value
    with pytest.raises(ValueError, match=message):
        abstract_unet(*inputs)
