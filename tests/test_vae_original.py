"""The VAE of the original single file (``svd*.safetensors``, ``*_image_decoder.safetensors``): tiny files written
with the original key names (from the reference's rename rules, tests/vae_helpers.py), converted and compared with
the diffusers model they were made from; the real-size key mapping; bad files."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import svd_jax
from convert import original_vae, rules
from convert.__main__ import main as convert_main
from parity import convert_inprocess, max_rel_err, nchw_to_nhwc, randomize, write_config_dir
from svd_jax.vae import AutoencoderKL, AutoencoderKLTemporalDecoder, decode_frames, encode_images
from vae_helpers import (DEC, EMBEDDER_DECODER, ENC, FIRST_STAGE_ENCODER, diffusers_vae, original_tensors,
                         real_size_expected_keys, real_size_original_shapes, unused_parts)

MODEL_TOL = 1e-4
def write_original_file(path, torch_vae, image_decoder: bool):
    channels = tuple(torch_vae.config.block_out_channels)
    layers = torch_vae.config.layers_per_block
    tensors = original_tensors(torch_vae.state_dict(), len(channels), temporal=not image_decoder)
    other = randomize(diffusers_vae("image", channels, layers), seed=99)
    tensors.update(unused_parts(original_tensors(other.state_dict(), len(channels), temporal=False), image_decoder))
    save_file(tensors, path)
    return tensors


def temporal_config(torch_vae) -> dict:
    """The diffusers ``AutoencoderKLTemporalDecoder`` config of the same sizes: what a user passes with --config."""
    config = {k: v for k, v in torch_vae.config.items() if not k.startswith("_")}
    keep = ("in_channels", "out_channels", "down_block_types", "block_out_channels", "layers_per_block",
            "latent_channels", "sample_size", "scaling_factor", "force_upcast")
    return {"_class_name": "AutoencoderKLTemporalDecoder", **{k: config[k] for k in keep}}


# (file name, image decoder?, block_out_channels, layers_per_block, image H, W). The temporal one has the sizes of
# test_vae.py's temporal case, so that the compiled encode and decode are shared when both run.
FILES = [("svd.safetensors", False, (32, 64), 2, 24, 16),
         ("svd_xt_image_decoder.safetensors", True, (32, 64, 64), 1, 16, 24)]


@pytest.mark.parametrize("name,image_decoder,channels,layers,h,w", FILES)
def test_single_file_parity(tmp_path, name, image_decoder, channels, layers, h, w):
    torch_vae = randomize(diffusers_vae("image" if image_decoder else "temporal", channels, layers), seed=layers)
    tensors = write_original_file(tmp_path / name, torch_vae, image_decoder)
    config_dir = write_config_dir(tmp_path / "cfg", "vae", temporal_config(torch_vae))
    convert_inprocess(tmp_path / name, tmp_path / "dst", "--config", str(config_dir), "--no-hash")

    vae = svd_jax.load(tmp_path / "dst", policy=svd_jax.Policy.float32()).vae
    assert isinstance(vae, AutoencoderKL if image_decoder else AutoencoderKLTemporalDecoder)
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    ignored = set(manifest["components"]["vae"]["ignored_source_keys"])
    unused = {k for k in tensors if k.startswith((FIRST_STAGE_ENCODER, EMBEDDER_DECODER))}
    assert unused and unused <= ignored
    assert manifest["components"]["vae"]["num_params"] == sum(p.numel() for p in torch_vae.parameters())

    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    z = torch.randn(3, 4, h // 2 ** (len(channels) - 1), w // 2 ** (len(channels) - 1),
                    generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = torch_vae.encode(x).latent_dist
        expected = torch_vae.decode(z, **({} if image_decoder else {"num_frames": 3})).sample
    mean, logvar = encode_images(vae, nchw_to_nhwc(x))
    assert max_rel_err(mean, nchw_to_nhwc(posterior.mean)) <= MODEL_TOL
    assert max_rel_err(logvar, nchw_to_nhwc(posterior.logvar)) <= MODEL_TOL
    assert max_rel_err(decode_frames(vae, nchw_to_nhwc(z), 3), nchw_to_nhwc(expected)) <= MODEL_TOL


# ---- real size --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_decoder", [False, True])
def test_real_size_original_maps_key_for_key(image_decoder):
    source = real_size_original_shapes(image_decoder)
    keys = sorted(source)
    config = original_vae.default_config(keys, "svd.safetensors")
    assert config == (svd_jax.VAEConfig.svd_image_decoder() if image_decoder else svd_jax.VAEConfig.svd())
    mapping, ignored = original_vae.rename(keys, config)
    assert set(keys) == {src for src, _ in mapping.values()} | set(ignored)
    shapes = {canonical: tuple(fn(np.broadcast_to(np.float32(0), source[src])).shape) if fn else source[src]
              for canonical, (src, fn) in mapping.items()}
    expected = real_size_expected_keys(config)
    assert rules.plan("vae", expected, shapes) == []
    assert set(shapes) == set(expected)


def test_config_follows_the_file():
    temporal = sorted(real_size_original_shapes(False))
    image = sorted(real_size_original_shapes(True))
    assert original_vae.adapt_config(svd_jax.VAEConfig.svd(), image).decoder == "image"
    assert original_vae.adapt_config(svd_jax.VAEConfig.svd_image_decoder(), temporal).decoder == "temporal"


# ---- bad files --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    torch_vae = randomize(diffusers_vae("temporal", (32, 64), 2), seed=5)
    tensors = write_original_file(root / "svd.safetensors", torch_vae, image_decoder=False)
    return tensors, write_config_dir(root / "cfg", "vae", temporal_config(torch_vae))


def _fails_cleanly(capsys, tmp_path, tensors, config_dir, *needles):
    src, dst = tmp_path / "svd.safetensors", tmp_path / "dst"
    save_file(tensors, src)
    args = [str(src), str(dst), "--no-hash"] + (["--config", str(config_dir)] if config_dir else [])
    assert convert_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]


def test_missing_decoder_key(tmp_path, capsys, original_file):
    tensors, config_dir = original_file
    key = DEC + "up.0.block.1.time_stack.out_layers.3.weight"
    _fails_cleanly(capsys, tmp_path, {k: v for k, v in tensors.items() if k != key}, config_dir,
                   "missing 1 keys", "decoder.up_blocks.1.resnets.1.temporal_res_block.conv2.weight")


def test_unknown_key(tmp_path, capsys, original_file):
    tensors, config_dir = original_file
    stray = DEC + "up.0.block.0.time_stack.emb_layers.1.weight"
    _fails_cleanly(capsys, tmp_path, {**tensors, stray: np.zeros((2, 2), np.float32)}, config_dir,
                   "unrecognised vae keys", stray)


def test_no_conditioning_encoder(tmp_path, capsys, original_file):
    tensors, config_dir = original_file
    _fails_cleanly(capsys, tmp_path, {k: v for k, v in tensors.items() if not k.startswith(ENC)}, config_dir,
                   "no conditioning encoder", ENC)


def test_tiny_file_without_config_names_the_size_problem(tmp_path, capsys, original_file):
    tensors, _ = original_file
    _fails_cleanly(capsys, tmp_path, tensors, None, "vae", "--config")
