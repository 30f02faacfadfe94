"""svd_jax generation benchmark: full-size SVD-XT with random weights (no download), on one accelerator.

Measures seconds per video and per step, VAE decode seconds, peak device memory, first-call compile seconds and
a warm second process's seconds to its first step (persistent compilation cache), and a bf16-vs-fp32 check of one
full-size UNet evaluation against a float32 PyTorch reference (TF32 off) when torch and diffusers are installed.
Writes JSON to ``--out`` (default ``$OUT/svd_jax.json``). Run the diffusers baseline in the same call, on the
same card, for the comparison (see benchmarks/README.md).

    python benchmarks/bench_generate.py                 # full size on the default accelerator
    python benchmarks/bench_generate.py --size tiny     # the same code path in seconds, e.g. on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import svd_jax
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig
from svd_jax.loader import random_models
from svd_jax.vae import decode_latents

SIZES = {
    # frames, height, width, steps, decode chunk
    "full": dict(num_frames=25, height=576, width=1024, num_inference_steps=25, decode_chunk_size=8),
    "tiny": dict(num_frames=4, height=64, width=96, num_inference_steps=3, decode_chunk_size=2),
}


def configs(size: str) -> dict:
    if size == "full":
        return {"image_encoder": CLIPVisionConfig.vit_h_14(), "unet": UNetConfig.svd_xt(), "vae": VAEConfig.svd()}
    return {"image_encoder": CLIPVisionConfig.tiny(), "unet": UNetConfig.tiny(), "vae": VAEConfig.tiny()}


def peak_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2 ** 30, 2)


class Results(dict):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def log(self, key, value):
        self[key] = value
        print(f"{key}: {value}", flush=True)
        with open(self.path, "w") as f:
            json.dump(self, f, indent=1)


def first_step_seconds(size: str, policy: str) -> float:
    """In this process: from nothing to the first denoising step done (load, compile or cache hit, one step)."""
    start = time.perf_counter()
    models = random_models(configs(size), getattr(svd_jax.Policy, policy)())
    svd_jax.loader.enable_compilation_cache()
    image = np.zeros((SIZES[size]["height"], SIZES[size]["width"], 3), np.uint8)
    svd_jax.generate(image, models, **{**SIZES[size], "num_inference_steps": 1}, output_type="latent", seed=0,
                     progress=False).block_until_ready()
    return time.perf_counter() - start


def unet_bf16_vs_fp32(results: Results) -> None:
    """One full-size UNet evaluation: svd_jax bf16 against diffusers in float32 (TF32 off), same random weights
    through the real converter. Reports the relative L2 error."""
    try:
        import torch
        from diffusers import UNetSpatioTemporalConditionModel
    except ImportError as e:
        results.log("bf16_vs_fp32", f"skipped ({e})")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from convert import convert

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel().eval()
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(f"{tmp}/src/unet")
        convert(f"{tmp}/src", f"{tmp}/dst", hash_sources=False)
        models = svd_jax.load(f"{tmp}/dst", policy=svd_jax.Policy.bfloat16())
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 25, 8, 72, 128, generator=g)
    timestep = torch.tensor([1.0, 1.0])
    context = torch.randn(2, 1, 1024, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        expected = unet.to(device)(sample.to(device), timestep.to(device), context.to(device), ids.to(device)).sample
    expected = expected.permute(0, 1, 3, 4, 2).float().cpu().numpy()
    del unet
    actual = jax.jit(lambda m, *a: m(*a))(models.unet, jnp.asarray(sample.permute(0, 1, 3, 4, 2).numpy(), jnp.bfloat16),
                                          jnp.asarray(timestep.numpy()), jnp.asarray(context.numpy(), jnp.bfloat16),
                                          jnp.asarray(ids.numpy(), jnp.bfloat16))
    actual = np.asarray(actual, np.float32)
    rel_l2 = float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
    results.log("unet_bf16_vs_torch_fp32_rel_l2", rel_l2)
    results.log("unet_bf16_finite", bool(np.isfinite(actual).all()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--policy", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "svd_jax.json"))
    parser.add_argument("--first-step-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-parity", action="store_true", help="skip the bf16-vs-fp32 UNet check")
    args = parser.parse_args(argv)
    if args.first_step_only:  # the warm second process
        print(json.dumps({"first_step_s": first_step_seconds(args.size, args.policy)}))
        return 0

    results = Results(args.out)
    results.log("versions", f"jax {jax.__version__} svd_jax {svd_jax.__version__} device {jax.devices()[0].device_kind}")
    results.log("settings", {"size": args.size, "policy": args.policy, **SIZES[args.size]})
    cache = tempfile.mkdtemp(prefix="svd_jax-bench-cache-")
    os.environ["SVD_JAX_CACHE"] = cache  # a cold persistent cache, filled by this process
    results.log("cold_first_step_s", round(first_step_seconds(args.size, args.policy), 2))
    warm = subprocess.run([sys.executable, __file__, "--size", args.size, "--policy", args.policy,
                           "--first-step-only"], capture_output=True, text=True, env=dict(os.environ))
    if warm.returncode == 0:
        results.log("warm_process_first_step_s", round(json.loads(warm.stdout.strip().splitlines()[-1])["first_step_s"], 2))
    else:
        results.log("warm_process_first_step_s", f"failed: {warm.stderr[-500:]}")

    models = random_models(configs(args.size), getattr(svd_jax.Policy, args.policy)())
    settings = SIZES[args.size]
    image = (np.random.default_rng(0).random((settings["height"], settings["width"], 3)) * 255).astype(np.uint8)
    step_times = []
    last = [time.perf_counter()]

    def on_step(step, sigma, latents):
        latents.block_until_ready()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    compile_run = svd_jax.generate(image, models, seed=0, progress=False, **{**settings, "num_inference_steps": 2})
    results.log("first_call_s_incl_compile", round(time.perf_counter() - start, 2))
    del compile_run
    start = last[0] = time.perf_counter()
    frames = svd_jax.generate(image, models, seed=0, progress=False, callback_on_step_end=on_step, **settings)
    total = time.perf_counter() - start
    results.log("generate_s", round(total, 2))
    results.log("step_s_median", round(float(np.median(step_times)), 4))
    results.log("peak_GiB", peak_gib())
    results.log("frames_finite", bool(np.isfinite(frames).all()))
    results.log("frames_mean", round(float(frames.mean()), 4))
    results.log("black_frames", int((frames.reshape(frames.shape[1], -1).max(-1) < 1 / 255).sum()))

    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    latents = jnp.asarray(np.random.default_rng(1).standard_normal(
        (1, settings["num_frames"], settings["height"] // scale, settings["width"] // scale, 4), np.float32))
    decode_latents(models.vae, latents, settings["decode_chunk_size"]).block_until_ready()
    start = time.perf_counter()
    decode_latents(models.vae, latents, settings["decode_chunk_size"]).block_until_ready()
    results.log("vae_decode_s", round(time.perf_counter() - start, 3))
    if not args.skip_parity and args.size == "full":
        del models
        unet_bf16_vs_fp32(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
