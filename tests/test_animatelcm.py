"""AnimateLCM-SVD-xt: its UNet file layout through the converter (a fine-tuned UNet in one diffusers-named file,
the rest from the base model) and its few-step consistency sampler as a preset."""

import json

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import svd_jax
from animatelcm_reference import AnimateLCMReferenceScheduler
from parity import convert_inprocess, max_rel_err, write_config_dir
from tiny_svd import tiny_pipeline


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
    convert_inprocess(root / "base", root / "converted", "--no-hash",
                      "--unet", str(root / "AnimateLCM-tiny.safetensors"), "--config", str(root / "config"))
    pipe.unet = distilled
    return root, pipe


def test_converter_takes_the_replacement_unet(animatelcm):
    """The converted folder holds the base's VAE and image encoder and the file's UNet (its weights are held to
    diffusers' UNet by the next test, which runs the distilled torch UNet)."""
    root, _ = animatelcm
    manifest = json.loads((root / "converted" / "manifest.json").read_text())
    assert manifest["source"]["unet_path"].endswith("AnimateLCM-tiny.safetensors")
    assert {f["name"] for f in manifest["source"]["files"]} >= {"AnimateLCM-tiny.safetensors"}
    assert set(manifest["components"]) == {"image_encoder", "unet", "vae"}
    assert manifest["components"]["unet"]["layout"] == "diffusers"


def test_unet_flag_needs_a_unet(animatelcm, capsys):
    from convert.__main__ import main

    root, _ = animatelcm
    assert main([str(root / "base"), str(root / "bad"), "--unet", str(root / "base" / "vae")]) == 2
    assert "--unet" in capsys.readouterr().err and not (root / "bad").exists()


def test_preset_matches_the_reference_sampler_in_diffusers_pipeline(animatelcm):
    """diffusers' StableVideoDiffusionPipeline driving the reference AnimateLCM scheduler (the authors' set-up)
    against svd_jax.generate with the animatelcm preset: same images, injected latents, augmentation and step noise."""
    root, pipe = animatelcm
    models = svd_jax.load(root / "converted", policy=svd_jax.Policy.float32())
    preset = dict(svd_jax.PRESETS["animatelcm"], num_frames=3, height=32, width=48)
    f, h, w, steps = preset["num_frames"], preset["height"], preset["width"], preset["num_inference_steps"]
    image = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    latents = torch.randn(1, f, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(1))
    aug_noise = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    step_noise = torch.randn(steps, 1, f, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(3))
    pipe.scheduler = AnimateLCMReferenceScheduler(noises=list(step_noise))
    diffusers_args = {k: v for k, v in preset.items() if k not in ("sampler", "schedule", "decode_chunk_size")}
    with torch.no_grad():
        expected = pipe(image, generator=torch.Generator().manual_seed(2), latents=latents, output_type="latent",
                        **diffusers_args).frames.permute(0, 1, 3, 4, 2).numpy()
    draws = iter(step_noise.permute(0, 1, 2, 4, 5, 3).numpy())
    actual = svd_jax.generate(image, models, latents=latents.permute(0, 1, 3, 4, 2).numpy(),
                              noise=aug_noise.permute(0, 2, 3, 1).numpy(), output_type="latent", progress=False,
                              sampler_options=dict(noise_sampler=lambda sigma, sigma_next: jnp.asarray(next(draws))),
                              **preset)
    assert max_rel_err(actual, expected) <= 1e-5


def test_cli_runs_the_tiny_model_with_the_animatelcm_preset(tmp_path, capsys):
    from svd_jax.cli import main

    image = tmp_path / "image.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "video.gif"
    assert main(["generate", str(image), "-o", str(out), "--model", "tiny", "--preset", "animatelcm",
                 "--num-frames", "2", "--height", "32", "--width", "32", "--seed", "0"]) == 0
    assert out.is_file()
    settings = json.loads(out.with_name(out.name + ".json").read_text())
    assert (settings["sampler"], settings["schedule"], settings["num_inference_steps"]) == ("lcm", "animatelcm", 4)
