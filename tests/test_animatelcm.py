"""AnimateLCM-SVD-xt: its UNet file layout through the converter (a fine-tuned UNet in one diffusers-named file,
the rest from the base model) and its few-step consistency sampler as a preset."""

import json

import jax
import numpy as np
import pytest
from safetensors.torch import save_file

import svd_jax
from parity import convert_inprocess, max_rel_err, write_config_dir
from tiny_svd import tiny_pipeline
from unet_helpers import jitted_call, to_jax_inputs, torch_unet_output, unet_inputs


@pytest.fixture(scope="module")
def animatelcm(tmp_path_factory):
    """A tiny base pipeline and a tiny 'distilled' UNet (other random weights) saved as AnimateLCM ships its UNet:
    one safetensors file of diffusers' UNet state dict; converted together with ``--unet``."""
    root = tmp_path_factory.mktemp("animatelcm")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "base")
    distilled = tiny_pipeline(seed=7).unet
    save_file({k: v.contiguous() for k, v in distilled.state_dict().items()}, root / "AnimateLCM-tiny.safetensors")
    write_config_dir(root / "config", "unet", dict(distilled.config))  # a bare file has no config: give the tiny one
    convert_inprocess(root / "base", root / "converted", "--no-hash", "--unet", str(root / "AnimateLCM-tiny.safetensors"),
                      "--config", str(root / "config"))
    pipe.unet = distilled
    return root, pipe


def test_converter_takes_the_replacement_unet(animatelcm):
    root, pipe = animatelcm
    manifest = json.loads((root / "converted" / "manifest.json").read_text())
    assert manifest["source"]["unet_path"].endswith("AnimateLCM-tiny.safetensors")
    assert {f["name"] for f in manifest["source"]["files"]} >= {"AnimateLCM-tiny.safetensors"}
    assert set(manifest["components"]) == {"image_encoder", "unet", "vae"}
    models = svd_jax.load(root / "converted", policy=svd_jax.Policy.float32())
    inputs = unet_inputs(1, 3, 4, 4, 32, context_tokens=1)
    run, _ = jitted_call(models.unet)
    assert max_rel_err(run(*to_jax_inputs(*inputs)), torch_unet_output(pipe.unet, *inputs)) <= 1e-4


def test_unet_flag_needs_a_unet(animatelcm, capsys):
    from convert.__main__ import main

    root, _ = animatelcm
    assert main([str(root / "base"), str(root / "bad"), "--unet", str(root / "base" / "vae")]) == 2
    assert "--unet" in capsys.readouterr().err and not (root / "bad").exists()
