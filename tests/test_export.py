"""Export to diffusers (``python -m convert --to-diffusers``): a tiny random SVD pipeline -> ``save_pretrained`` ->
``python -m convert`` -> ``--to-diffusers`` -> ``from_pretrained`` gives back every tensor exactly and the same
configs; fine-tuned svd_jax params exported to diffusers compute what svd_jax computes; partial folders, dtype
casts, the original (sgm) UNet eps, and bad input."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableVideoDiffusionPipeline
from diffusers import UNetSpatioTemporalConditionModel as TorchUNet
from safetensors.torch import load_file

import svd_jax
from convert.__main__ import main
from parity import convert_inprocess, max_rel_err, randomize
from convert.export import image_encoder_config, unet_config, vae_config
from svd_jax.checkpoint import load_params
from svd_jax.checkpoint import save_params
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig
from tiny_svd import SVD_SCHEDULER, tiny_pipeline
from unet_helpers import jitted_call, to_jax_inputs, torch_unet_output, unet_inputs

COMPONENTS = ("unet", "vae", "image_encoder")


def export_cli(capsys, *args):
    """``python -m convert --to-diffusers ...`` in-process: exit code, stderr, stdout."""
    code = main(["--to-diffusers", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


def assert_clean_failure(code, err, out, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "partial output left behind"


def plain(config: dict) -> dict:
    """A config's own fields (no ``_``-prefixed bookkeeping), tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """The tiny pipeline, its converted folder, and that folder exported back to diffusers."""
    root = tmp_path_factory.mktemp("export")
    pipe = tiny_pipeline(seed=11)
    pipe.save_pretrained(root / "src")
    convert_inprocess(root / "src", root / "converted", "--no-hash")
    assert main(["--to-diffusers", str(root / "converted"), str(root / "out")]) == 0
    return pipe, root


def test_pipeline_round_trip_is_exact(round_trip):
    pipe, root = round_trip
    assert json.loads((root / "out" / "model_index.json").read_text())["vae"] == ["diffusers",
                                                                                  "AutoencoderKLTemporalDecoder"]
    loaded = StableVideoDiffusionPipeline.from_pretrained(root / "out")
    for name in COMPONENTS:
        original, exported = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(exported) == set(original), name
        for key, tensor in original.items():
            assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), f"{name}: {key}"
    for name in ("unet", "vae"):
        assert plain(getattr(loaded, name).config) == plain(getattr(pipe, name).config), name
    clip_fields = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
                   "num_channels", "image_size", "patch_size", "layer_norm_eps", "hidden_act")
    assert ({f: getattr(loaded.image_encoder.config, f) for f in clip_fields}
            == {f: getattr(pipe.image_encoder.config, f) for f in clip_fields})
    assert pipe.image_encoder.config.hidden_act == "quick_gelu"  # a non-default value travels both ways
    assert {k: loaded.scheduler.config[k] for k in SVD_SCHEDULER} == SVD_SCHEDULER
    assert type(loaded.scheduler) is type(pipe.scheduler)
    processor_fields = ("image_mean", "image_std", "crop_size", "size", "resample", "do_normalize", "rescale_factor")
    original, exported = pipe.feature_extractor.to_dict(), loaded.feature_extractor.to_dict()
    assert {k: exported[k] for k in processor_fields} == {k: original[k] for k in processor_fields}
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


# Leaves of different kinds (conv, linear in attention, temporal conv, norm scale, mix factor, embedding).
TUNED_LEAVES = ("conv_in.kernel", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.kernel",
                "down_blocks.0.resnets.0.time_mixer.mix_factor", "up_blocks.1.resnets.0.temporal_res_block.conv1.kernel",
                "mid_block.attentions.0.temporal_transformer_blocks.0.ff.net.2.kernel", "conv_norm_out.scale",
                "add_embedding.linear_1.kernel")


def test_fine_tuned_unet_exports_what_svd_jax_computes(round_trip, tmp_path, capsys):
    """Fine-tuning's round trip: params changed in svd_jax and saved as a converted folder (checkpoint +
    config.json + manifest.json) export to a diffusers UNet that computes what svd_jax computes."""
    pipe, root = round_trip
    params = load_params(root / "converted" / "unet")
    rng = np.random.default_rng(5)
    for key in TUNED_LEAVES:
        params[key] = params[key] + (0.5 * params[key].std() + 0.1) * rng.standard_normal(params[key].shape,
                                                                                            np.float32)
    tuned = tmp_path / "tuned"
    (tuned / "unet").mkdir(parents=True)
    save_params(tuned / "unet", params)
    shutil.copy(root / "converted" / "unet" / "config.json", tuned / "unet" / "config.json")
    (tuned / "manifest.json").write_text(json.dumps({"format": "svd_jax", "components": {"unet": {}}}))

    code, _, out = export_cli(capsys, tuned, tmp_path / "out")
    assert code == 0 and "no model_index.json" in out
    assert not (tmp_path / "out" / "model_index.json").exists() and not (tmp_path / "out" / "vae").exists()
    torch_unet = TorchUNet.from_pretrained(tmp_path / "out" / "unet").eval()
    jax_unet = svd_jax.load(tuned, policy=svd_jax.Policy.float32()).unet
    inputs = unet_inputs(2, 3, 8, 8, 32, seed=4)
    expected = torch_unet_output(torch_unet, *inputs)
    run, _ = jitted_call(jax_unet)
    assert max_rel_err(run(*to_jax_inputs(*inputs)), expected) <= 1e-4
    assert max_rel_err(torch_unet_output(pipe.unet, *inputs), expected) > 1e-2  # the tuning is visible


def test_cast_on_export_and_force(round_trip, tmp_path):
    pipe, root = round_trip
    dtype = "bfloat16"
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["--to-diffusers", str(root / "converted"), str(out), "--dtype", dtype, "--force"]) == 0
    assert not (out / "stale.txt").exists()
    files = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
             "image_encoder": "image_encoder/model.safetensors"}
    for name, file in files.items():
        tensors = load_file(out / file)
        original = getattr(pipe, name).state_dict()
        for key, tensor in tensors.items():
            assert tensor.dtype == getattr(torch, dtype)
            assert torch.equal(tensor, original[key].to(getattr(torch, dtype))), f"{name}: {key}"
    assert json.loads((out / "image_encoder" / "config.json").read_text())["dtype"] == dtype


def test_image_decoder_vae(tmp_path):
    """The per-frame image-decoder VAE exports as diffusers ``AutoencoderKL`` (its own config fields included)."""
    vae = randomize(AutoencoderKL(block_out_channels=(16, 48), layers_per_block=2, latent_channels=4,
                                  norm_num_groups=16, sample_size=24, scaling_factor=0.13,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2), seed=3)
    vae.save_pretrained(tmp_path / "src" / "vae")
    convert_inprocess(tmp_path / "src", tmp_path / "converted", "--no-hash")
    assert main(["--to-diffusers", str(tmp_path / "converted"), str(tmp_path / "out")]) == 0
    loaded = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")
    original, exported = vae.state_dict(), loaded.state_dict()
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    assert plain(loaded.config) == plain(vae.config)


# ---- the original (sgm) UNet eps, and bad input ----

def _copy_with_config(root, folder, component, change):
    """A converted folder holding one component of ``root/converted`` with its config changed."""
    shutil.copytree(root / "converted" / component, folder / component)
    config = json.loads((folder / component / "config.json").read_text())
    config_class = {"unet": UNetConfig, "image_encoder": CLIPVisionConfig}[component]
    change(config_class.from_dict(config)).save(folder / component / "config.json")
    (folder / "manifest.json").write_text(json.dumps({"format": "svd_jax", "components": {component: {}}}))
    return folder


def test_original_unet_eps_needs_consent(round_trip, tmp_path, capsys):
    _, root = round_trip
    src = _copy_with_config(root, tmp_path / "sgm", "unet", UNetConfig.with_original_norm_eps)
    code, err, _ = export_cli(capsys, src, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "unet", "down_resnet_eps", "--accept-diffusers-eps")
    assert not (tmp_path / "out").exists()
    code, err, _ = export_cli(capsys, src, tmp_path / "out", "--accept-diffusers-eps")
    assert code == 0 and err.startswith("warning: unet") and "up_resnet_eps" in err, err
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_params_that_do_not_fit_the_config(round_trip, tmp_path, capsys):
    _, root = round_trip
    src = _copy_with_config(root, tmp_path / "bad", "image_encoder",
                            lambda c: dataclasses.replace(c, num_hidden_layers=c.num_hidden_layers + 1))
    code, err, _ = export_cli(capsys, src, tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "params do not fit", "missing", "layers.2.")
    assert not (tmp_path / "out").exists()


def test_bad_input(round_trip, tmp_path, capsys):
    _, root = round_trip
    code, err, _ = export_cli(capsys, tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(code, err, tmp_path / "out", "nope", "no such folder")
    code, err, _ = export_cli(capsys, root / "src", tmp_path / "out")  # a diffusers folder, not converted
    assert_clean_failure(code, err, tmp_path / "out", "not a converted svd_jax folder", "python -m convert")
    assert not (tmp_path / "out").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, err, _ = export_cli(capsys, root / "converted", existing)
    assert_clean_failure(code, err, existing, "already exists", "--force")
    assert (existing / "keep.txt").read_text() == "mine"

    code, err, _ = export_cli(capsys, root / "converted", tmp_path / "out", "--config", root / "src")
    assert code == 2 and "--config" in err and not (tmp_path / "out").exists()
    code = main([str(root / "src"), str(tmp_path / "out"), "--dtype", "float16"])
    assert code == 2 and "--to-diffusers" in capsys.readouterr().err and not (tmp_path / "out").exists()


# The hub repos' vae/ and image_encoder/ config.json fields (reference, sections 3.1 and 5b).
SVD_VAE_HUB_CONFIG = {"_class_name": "AutoencoderKLTemporalDecoder", "block_out_channels": [128, 256, 512, 512],
                      "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
                      "latent_channels": 4, "layers_per_block": 2, "out_channels": 3, "sample_size": 768,
                      "scaling_factor": 0.18215}
SVD_CLIP_HUB_CONFIG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                       "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "projection_dim": 1024,
                       "layer_norm_eps": 1e-5, "hidden_act": "gelu", "dtype": "float16"}


def test_full_size_configs_match_the_hub():
    from test_unet import SVD_XT_HUB_CONFIG

    def fields(config):
        return {k: v for k, v in config.items() if k != "_diffusers_version"}

    assert fields(unet_config(UNetConfig.svd_xt())) == SVD_XT_HUB_CONFIG
    assert fields(vae_config(VAEConfig.svd())) == SVD_VAE_HUB_CONFIG
    clip = image_encoder_config(CLIPVisionConfig.vit_h_14(), "float16")
    assert {k: clip[k] for k in SVD_CLIP_HUB_CONFIG} == SVD_CLIP_HUB_CONFIG
    assert clip["architectures"] == ["CLIPVisionModelWithProjection"]
