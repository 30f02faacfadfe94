"""Whole-VAE parity through the real converter (diffusers folders) against diffusers' ``AutoencoderKLTemporalDecoder``
and ``AutoencoderKL``, float32, random weights; the pipeline's chunked decode; bad input; real-size key mapping."""

import json
import types

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import AutoencoderKLTemporalDecoder as TorchAutoencoderKLTemporalDecoder
from diffusers import StableVideoDiffusionPipeline
from flax import nnx
from safetensors.numpy import save_file

import svd_jax
from convert import rules
from convert.__main__ import main as convert_main
from parity import convert_inprocess, max_rel_err, nchw_to_nhwc, randomize
from svd_jax import vae as vae_module
from svd_jax.vae import AutoencoderKL, AutoencoderKLTemporalDecoder, decode_frames, decode_latents, encode_images
from vae_helpers import diffusers_vae, real_size_expected_keys

MODEL_TOL = 1e-4
# name: (decoder kind, block_out_channels, layers_per_block, extra diffusers config, image H, W). Each decoded
# frame count is one compilation, so the tests reuse frame counts. tests/test_vae_original.py adds other sizes.
CASES = {
    "temporal": ("temporal", (32, 64), 2, {}, 24, 16),
    "image": ("image", (32, 64), 2, {"norm_num_groups": 16, "latent_channels": 3}, 24, 16),
}
DECODES = [("temporal", 1), ("temporal", 3), ("temporal", 5), ("image", 1), ("image", 3)]
# (case, batch, frames, decode_chunk_size): chunks of 3 over 2 x 5 frames are 3, 3 (spanning both videos), 3, 1.
CHUNKED = [("temporal", 2, 5, 3), ("image", 2, 3, 1)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``converted(name)`` -> (torch VAE, converted svd_jax VAE, case): each tiny config once, through
    ``save_pretrained`` and the converter."""
    cache = {}

    def get(name):
        if name not in cache:
            kind, channels, layers, extra, h, w = CASES[name]
            root = tmp_path_factory.mktemp(name)
            torch_vae = randomize(diffusers_vae(kind, channels, layers, **extra), seed=len(channels) * 10 + layers)
            torch_vae.save_pretrained(root / "src" / "vae")
            convert_inprocess(root / "src", root / "dst", "--no-hash")
            vae = svd_jax.load(root / "dst", policy=svd_jax.Policy.float32()).vae
            cache[name] = torch_vae, vae, CASES[name]
        return cache[name]

    return get


def latents_for(case, n, seed):
    kind, channels, _, extra, h, w = case
    c = extra.get("latent_channels", 4)
    scale = 2 ** (len(channels) - 1)
    return torch.randn(n, c, h // scale, w // scale, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_encode(converted, name):
    torch_vae, vae, case = converted(name)
    assert isinstance(vae, AutoencoderKLTemporalDecoder if case[0] == "temporal" else AutoencoderKL)
    assert vae.config.block_out_channels == case[1]
    *_, h, w = case
    # well outside [-1, 1] as well, so that large logvars would meet the clamp
    x = 2 * torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        posterior = torch_vae.encode(x).latent_dist
    mean, logvar = encode_images(vae, nchw_to_nhwc(x))
    assert max_rel_err(mean, nchw_to_nhwc(posterior.mean)) <= MODEL_TOL
    assert max_rel_err(logvar, nchw_to_nhwc(posterior.logvar)) <= MODEL_TOL


@pytest.mark.parametrize("name,num_frames", DECODES)
def test_decode(converted, name, num_frames):
    torch_vae, vae, case = converted(name)
    z = latents_for(case, num_frames, seed=num_frames)
    with torch.no_grad():
        kwargs = {"num_frames": num_frames} if case[0] == "temporal" else {}
        expected = torch_vae.decode(z, **kwargs).sample
    actual = decode_frames(vae, nchw_to_nhwc(z), num_frames)
    assert max_rel_err(actual, nchw_to_nhwc(expected)) <= MODEL_TOL


@pytest.mark.parametrize("name,b,f,chunk", CHUNKED)
def test_chunked_decode_matches_the_pipeline(converted, name, b, f, chunk):
    """diffusers' ``decode_latents`` flattens batch and frames and decodes each chunk as its own video. With the
    temporal decoder the chunk size changes the output (its temporal layers see only their chunk)."""
    torch_vae, vae, case = converted(name)
    latents = latents_for(case, b * f, seed=11)
    ours = nchw_to_nhwc(latents).reshape(b, f, *latents.shape[2:], -1)
    outputs = {}
    for size in (chunk, f):
        with torch.no_grad():
            expected = StableVideoDiffusionPipeline.decode_latents(
                types.SimpleNamespace(vae=torch_vae), latents.reshape(b, f, *latents.shape[1:]), num_frames=f,
                decode_chunk_size=size)
        expected = expected.permute(0, 2, 3, 4, 1).numpy()  # [B, C, F, H, W] -> [B, F, H, W, C]
        outputs[size] = decode_latents(vae, ours, None if size == f else size)
        assert outputs[size].dtype == np.float32
        assert max_rel_err(outputs[size], expected) <= MODEL_TOL
    if case[0] == "image":
        assert max_rel_err(outputs[chunk], outputs[f]) <= 1e-6
    elif chunk != f:
        assert max_rel_err(outputs[chunk], outputs[f]) > 1e-3


def test_each_chunk_shape_compiles_once(converted):
    _, vae, case = converted("temporal")
    latents = nchw_to_nhwc(latents_for(case, 4, seed=5))
    latents = latents.reshape(2, 2, *latents.shape[1:])
    decode_latents(vae, latents, 3)
    size = vae_module._decode._cache_size()
    for _ in range(2):
        decode_latents(vae, latents, 3)
    assert vae_module._decode._cache_size() == size


def test_fp16_folder(tmp_path):
    """A ``.fp16`` variant converts, keeps float16 in the checkpoint and matches the float16 weights."""
    kind, channels, layers, extra, _, _ = CASES["temporal"]  # the config of the tests above: compiled once
    torch_vae = randomize(diffusers_vae(kind, channels, layers, **extra), seed=4).half()
    torch_vae.save_pretrained(tmp_path / "vae", variant="fp16")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    convert_inprocess(tmp_path / "vae", tmp_path / "dst", "--no-hash")
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert set(manifest["components"]["vae"]["dtypes"]) == {"float16"}
    vae = svd_jax.load(tmp_path / "dst", policy=svd_jax.Policy.float32()).vae
    z = latents_for(CASES["temporal"], 3, seed=1)
    with torch.no_grad():
        expected = torch_vae.float().decode(z, num_frames=3).sample
    assert max_rel_err(decode_frames(vae, nchw_to_nhwc(z), 3), nchw_to_nhwc(expected)) <= MODEL_TOL


# ---- bad input --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    return nnx.eval_shape(lambda: AutoencoderKLTemporalDecoder(svd_jax.VAEConfig.tiny(), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("call,message", [
    (lambda v: v.encode(np.zeros((2, 3, 16, 16), np.float32)), r"x \[N, H, W, 3\].*\(2, 3, 16, 16\)"),
    (lambda v: v.encode(np.zeros((16, 16, 3), np.float32)), r"x \[N, H, W, 3\]"),
    (lambda v: v.decode(np.zeros((2, 4, 2, 2), np.float32), 2), r"z \[N, h, w, 4\].*\(2, 4, 2, 2\)"),
    (lambda v: v.decode(np.zeros((5, 2, 2, 4), np.float32), 2), r"5 latents .* num_frames=2"),
    (lambda v: v.decode(np.zeros((2, 2, 2, 4), np.float32), 0), r"num_frames must be a positive int"),
    (lambda v: decode_latents(v, np.zeros((4, 2, 2, 4), np.float32)), r"latents \[B, F, h, w, C\]"),
    (lambda v: decode_latents(v, np.zeros((1, 4, 2, 2, 4), np.float32), 0), r"decode_chunk_size"),
])
def test_bad_call_arguments(tiny_vae, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_vae)


def test_config_mismatch_is_refused():
    with pytest.raises(ValueError, match="decoder='image'"):
        nnx.eval_shape(lambda: AutoencoderKL(svd_jax.VAEConfig.tiny("temporal"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="32 GroupNorm groups"):
        svd_jax.VAEConfig(norm_num_groups=16, block_out_channels=(32, 64))


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "vae"
    randomize(diffusers_vae("temporal", (32, 64), 1)).save_pretrained(folder)
    return folder


def _broken_copy(src, dst, change):
    from safetensors.numpy import load_file

    tensors = load_file(src / "diffusion_pytorch_model.safetensors")
    change(tensors)
    dst.mkdir(parents=True)
    save_file(tensors, dst / "diffusion_pytorch_model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _assert_fails_cleanly(capsys, src, dst, *needles):
    assert convert_main([str(src), str(dst), "--no-hash"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def test_missing_key(tmp_path, capsys, vae_folder):
    key = "decoder.up_blocks.0.resnets.1.temporal_res_block.conv2.weight"
    src = _broken_copy(vae_folder, tmp_path / "src" / "vae", lambda t: t.pop(key))
    _assert_fails_cleanly(capsys, src, tmp_path / "dst", "missing 1 keys", key)


def test_wrong_shape(tmp_path, capsys, vae_folder):
    key = "decoder.time_conv_out.weight"
    src = _broken_copy(vae_folder, tmp_path / "src" / "vae",
                       lambda t: t.__setitem__(key, np.zeros((3, 3, 5, 1, 1), np.float32)))
    _assert_fails_cleanly(capsys, src, tmp_path / "dst", key, "[3, 3, 5, 1, 1]")


def test_unet_file_in_the_vae_folder(tmp_path, capsys):
    folder = tmp_path / "src" / "vae"
    folder.mkdir(parents=True)
    save_file({"time_embedding.linear_1.weight": np.zeros((8, 4), np.float32),
               "add_embedding.linear_1.weight": np.zeros((8, 4), np.float32),
               "conv_in.weight": np.zeros((4, 8, 3, 3), np.float32)}, folder / "diffusion_pytorch_model.safetensors")
    _assert_fails_cleanly(capsys, tmp_path / "src", tmp_path / "dst", "holds a unet checkpoint", "vae")


def test_image_decoder_config_for_a_temporal_file(tmp_path, capsys, vae_folder):
    config = json.loads((vae_folder / "config.json").read_text())
    (tmp_path / "cfg" / "vae").mkdir(parents=True)
    (tmp_path / "cfg" / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    dst = tmp_path / "dst"
    assert convert_main([str(vae_folder), str(dst), "--config", str(tmp_path / "cfg"), "--no-hash"]) == 2
    err = capsys.readouterr().err
    assert "temporal VAE decoder" in err and "config says image" in err
    assert not dst.exists()


# ---- real size --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["temporal", "image"])
def test_real_size_maps_key_for_key(kind):
    """A full-size diffusers VAE (meta device) and the SVD preset agree key for key and shape for shape."""
    config = svd_jax.VAEConfig.svd() if kind == "temporal" else svd_jax.VAEConfig.svd_image_decoder()
    with torch.device("meta"):
        if kind == "temporal":
            torch_vae = TorchAutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                                          down_block_types=("DownEncoderBlock2D",) * 4)
        else:
            torch_vae = TorchAutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                           down_block_types=("DownEncoderBlock2D",) * 4,
                                           up_block_types=("UpDecoderBlock2D",) * 4)
    source = {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}
    expected = real_size_expected_keys(config)
    assert rules.plan("vae", expected, source) == []
    assert set(source) == set(expected)
    if kind == "temporal":
        assert sum(int(np.prod(s)) for s in source.values()) == sum(p.numel() for p in torch_vae.parameters())

