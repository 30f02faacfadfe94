"""CLIP image encoder parity through the real converter: transformers and OpenCLIP layouts, several sizes."""

import json

import jax
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import CLIPVisionConfig as HFCLIPVisionConfig
from transformers import CLIPVisionModelWithProjection

import svd_jax
from parity import convert_inprocess, load_open_clip_transformer, max_rel_err, nchw_to_nhwc, randomize, write_config_dir

# (hidden, intermediate, projection, layers, heads, image, patch)
SIZES = [
    (32, 37, 24, 2, 4, 30, 10),
    (48, 96, 16, 3, 3, 28, 7),
    (64, 128, 40, 1, 8, 32, 16),
]


def hf_config(hidden, inter, proj, layers, heads, image, patch, eps=1e-5):
    return HFCLIPVisionConfig(hidden_size=hidden, intermediate_size=inter, projection_dim=proj,
                              num_hidden_layers=layers, num_attention_heads=heads, image_size=image,
                              patch_size=patch, layer_norm_eps=eps, hidden_act="gelu")


@pytest.mark.parametrize("size", SIZES)
def test_transformers_folder_parity(tmp_path, size):
    torch_model = randomize(CLIPVisionModelWithProjection(hf_config(*size)), seed=sum(size))
    torch_model.save_pretrained(tmp_path / "src" / "image_encoder")
    convert_inprocess(tmp_path / "src", tmp_path / "dst", "--no-hash")

    models = svd_jax.load(tmp_path / "dst", policy=svd_jax.Policy.float32())
    pixels = torch.randn(2, 3, size[5], size[5], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch_model(pixel_values=pixels).image_embeds.numpy()
    actual = models.image_encoder(nchw_to_nhwc(pixels))
    assert actual.shape == expected.shape
    assert max_rel_err(actual, expected) <= 1e-5
    # jit with the parameters as arguments gives the same result
    graphdef, state = nnx.split(models.image_encoder)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    assert max_rel_err(jitted(state, nchw_to_nhwc(pixels)), expected) <= 1e-5


def test_fp16_weights_file_is_used_and_cast(tmp_path):
    torch_model = randomize(CLIPVisionModelWithProjection(hf_config(*SIZES[0])), seed=3).half()
    folder = tmp_path / "image_encoder"
    torch_model.save_pretrained(folder, variant="fp16")
    assert (folder / "model.fp16.safetensors").is_file()
    convert_inprocess(folder, tmp_path / "dst", "--no-hash")
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert set(manifest["components"]["image_encoder"]["dtypes"]) == {"float16"}
    models = svd_jax.load(tmp_path / "dst", policy=svd_jax.Policy.float32())
    pixels = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch_model.float()(pixel_values=pixels).image_embeds.numpy()
    assert max_rel_err(models.image_encoder(nchw_to_nhwc(pixels)), expected) <= 1e-5


OPENCLIP_PREFIX = "conditioner.embedders.0.open_clip.model."


@pytest.mark.parametrize("size", SIZES[:2])
def test_openclip_single_file_parity(tmp_path, size):
    hidden, inter, proj, layers, heads, image, patch = size
    oc = load_open_clip_transformer()
    torch_model = oc.VisionTransformer(image_size=image, patch_size=patch, width=hidden, layers=layers, heads=heads,
                                       mlp_ratio=inter / hidden, output_dim=proj)
    assert torch_model.transformer.resblocks[0].mlp.c_fc.out_features == inter
    randomize(torch_model, seed=7 + hidden)
    tensors = {OPENCLIP_PREFIX + "visual." + k: v.contiguous() for k, v in torch_model.state_dict().items()}
    # the text tower's leftover parameters, as in the original file
    tensors[OPENCLIP_PREFIX + "token_embedding.weight"] = torch.randn(10, 8)
    tensors[OPENCLIP_PREFIX + "positional_embedding"] = torch.randn(5, 8)
    tensors[OPENCLIP_PREFIX + "ln_final.weight"] = torch.randn(8)
    tensors[OPENCLIP_PREFIX + "ln_final.bias"] = torch.randn(8)
    tensors[OPENCLIP_PREFIX + "text_projection"] = torch.randn(8, 8)
    tensors[OPENCLIP_PREFIX + "logit_scale"] = torch.randn(())
    save_file(tensors, tmp_path / "svd.safetensors")
    config_dir = write_config_dir(tmp_path / "cfg", "image_encoder", hf_config(*size).to_dict())
    convert_inprocess(tmp_path / "svd.safetensors", tmp_path / "dst", "--config", str(config_dir), "--no-hash")

    models = svd_jax.load(tmp_path / "dst", policy=svd_jax.Policy.float32())
    pixels = torch.randn(3, 3, image, image, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = torch_model(pixels).numpy()
    assert max_rel_err(models.image_encoder(nchw_to_nhwc(pixels)), expected) <= 1e-5
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert OPENCLIP_PREFIX + "logit_scale" in manifest["components"]["image_encoder"]["ignored_source_keys"]


def test_vit_h_14_maps_key_for_key():
    """Every key of a real-size transformers model (meta device, no weights) maps onto the abstract model."""
    from convert import rules
    from svd_jax.components import abstract_model

    config = svd_jax.CLIPVisionConfig.vit_h_14()
    with torch.device("meta"):
        torch_model = CLIPVisionModelWithProjection(HFCLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
            num_attention_heads=16, image_size=224, patch_size=14, layer_norm_eps=1e-5, hidden_act="gelu"))
    source = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    expected = rules.expected_keys(abstract_model("image_encoder", config))
    ignored = rules.plan("image_encoder", expected, source)
    assert set(source) - set(ignored) == set(expected)
    assert all(k.endswith("position_ids") for k in ignored)
