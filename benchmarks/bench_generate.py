"""svd_jax generation benchmark: full-size SVD-XT with random weights (no download), on one accelerator.

Measures, in this order: a cold process's time to its first denoising step (compilation with an empty persistent
cache), seconds per video and per step, peak device memory, VAE decode seconds; then it saves the models as a
converted folder, and a warm second process loads them with ``svd_jax.load`` and reports its time from process
start to its first step (persistent compilation cache), then generates a whole video under a 20 GiB memory limit
(a 24 GB card). Writes JSON to ``--out`` (default ``results/svd_jax.json``) after every figure, so a run cut short
keeps what it measured. Run the diffusers baseline in the same call, on the same card (see benchmarks/README.md).

    python benchmarks/bench_generate.py                 # full size on the default accelerator
    python benchmarks/bench_generate.py --size tiny     # the same code path in seconds, e.g. on CPU
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: a process's time to first step includes them

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import svd_jax  # noqa: E402
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig  # noqa: E402
from svd_jax.loader import random_models  # noqa: E402
from svd_jax.vae import decode_latents  # noqa: E402

SIZES = {
    # frames, height, width, steps, decode chunk
    "full": dict(num_frames=25, height=576, width=1024, num_inference_steps=25, decode_chunk_size=8),
    "tiny": dict(num_frames=4, height=64, width=96, num_inference_steps=3, decode_chunk_size=2),
}
SMALL_CARD_GIB = 20  # what a 24 GB card leaves a process, with room for the driver and other allocations


def configs(size: str) -> dict:
    if size == "full":
        return {"image_encoder": CLIPVisionConfig.vit_h_14(), "unet": UNetConfig.svd_xt(), "vae": VAEConfig.svd()}
    return {"image_encoder": CLIPVisionConfig.tiny(), "unet": UNetConfig.tiny(), "vae": VAEConfig.tiny()}


class NormalPool:
    """Unit normals cut from one pre-drawn pool at random offsets: the full-size models' 2.2e9 weights in
    seconds instead of the tens of seconds fresh draws take (speed does not depend on the values)."""

    def __init__(self, size: int = 1 << 24, seed: int = 0):
        self.values = np.random.default_rng(seed).standard_normal(size, dtype=np.float32)

    def __call__(self, rng: np.random.Generator, shape) -> np.ndarray:
        n = int(np.prod(shape))
        if n > self.values.size:
            return np.resize(self.values, n).reshape(shape)
        start = int(rng.integers(0, self.values.size - n + 1))
        return self.values[start:start + n].reshape(shape)


def build_models(size: str, policy: svd_jax.Policy):
    return random_models(configs(size), policy, draw=NormalPool())


def policy_for(args) -> svd_jax.Policy:
    return getattr(svd_jax.Policy, args.policy)(args.attention)


def peak_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2 ** 30, 2)


def test_image(size: str) -> np.ndarray:
    settings = SIZES[size]
    return (np.random.default_rng(0).random((settings["height"], settings["width"], 3)) * 255).astype(np.uint8)


class Results(dict):
    def __init__(self, path: str):
        super().__init__()
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def log(self, key, value):
        self[key] = value
        print(f"{key}: {value}", flush=True)
        with open(self.path, "w") as f:
            json.dump(self, f, indent=1)

    def section(self, name: str, fn, *args):
        """Run one measurement; a failure is recorded and the next measurement still runs."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc()
            self.log(f"{name}_error", f"{type(e).__name__}: {str(e)[:1000]}")
            return None


def first_step(models, size: str) -> None:
    settings = {**SIZES[size], "num_inference_steps": 1}
    svd_jax.generate(test_image(size), models, **settings, output_type="latent", seed=0,
                     progress=False).block_until_ready()


def warm_child(args) -> int:
    """The warm second process, as a user's: load the converted folder, first step (compilations from the
    persistent cache), then one whole video under the memory limit the parent set. One JSON line per figure."""
    start = time.time()
    svd_jax.enable_compilation_cache()
    models = svd_jax.load(args.warm_child, policy=policy_for(args))
    loaded = time.time()
    first_step(models, args.size)
    done = time.time()
    first_step(models, args.size)  # the same work without loading programs: the first step's own share
    again = time.time() - done
    print(json.dumps({"warm_process_first_step_s": round(done - PROCESS_START, 2),
                      "warm_imports_s": round(start - PROCESS_START, 2),
                      "warm_load_s": round(loaded - start, 2),
                      "warm_first_step_after_load_s": round(done - loaded, 2),
                      "warm_same_step_again_s": round(again, 2)}), flush=True)
    start = time.perf_counter()
    frames = svd_jax.generate(test_image(args.size), models, seed=0, progress=False, **SIZES[args.size])
    print(json.dumps({"limited_memory_generate_s": round(time.perf_counter() - start, 2),
                      "limited_memory_peak_GiB": peak_gib(),
                      "limited_memory_frames_finite": bool(np.isfinite(frames).all())}), flush=True)
    return 0


def device_memory_limit_fraction(limit_gib: float) -> str | None:
    """XLA_PYTHON_CLIENT_MEM_FRACTION that caps a process at ``limit_gib`` on this GPU (None off GPU)."""
    if jax.default_backend() != "gpu":
        return None
    try:
        total = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None
    return f"{limit_gib * 1024 / float(total):.4f}"


def measure_generation(results: Results, args):
    """The main figures; returns the models."""
    settings = SIZES[args.size]
    start = time.perf_counter()
    models = build_models(args.size, policy_for(args))
    results.log("weights_s", round(time.perf_counter() - start, 2))
    start = time.perf_counter()
    first_step(models, args.size)
    now = time.perf_counter()
    results.log("cold_first_step_s", round(now - start, 2))
    results.log("cold_process_first_step_s", round(time.time() - PROCESS_START, 2))

    image = test_image(args.size)
    start = time.perf_counter()
    svd_jax.generate(image, models, seed=0, progress=False, **{**settings, "num_inference_steps": 2})
    results.log("first_video_call_s_incl_decode_compile", round(time.perf_counter() - start, 2))
    start = time.perf_counter()
    frames = svd_jax.generate(image, models, seed=0, progress=False, **settings)
    results.log("generate_s", round(time.perf_counter() - start, 2))
    results.log("peak_GiB", peak_gib())
    results.log("frames_finite", bool(np.isfinite(frames).all()))
    results.log("frames_mean", round(float(frames.mean()), 4))
    results.log("black_frames", int((frames.reshape(frames.shape[1], -1).max(-1) < 1 / 255).sum()))

    step_times, last = [], [0.0]

    def on_step(step, sigma, latents):
        latents.block_until_ready()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    last[0] = time.perf_counter()
    svd_jax.generate(image, models, seed=0, progress=False, output_type="latent", callback_on_step_end=on_step,
                     **settings).block_until_ready()
    results.log("step_s_median", round(float(np.median(step_times[1:] or step_times)), 4))

    scale = models.vae.config.downsample_factor
    latents = jnp.asarray(np.random.default_rng(1).standard_normal(
        (1, settings["num_frames"], settings["height"] // scale, settings["width"] // scale, 4), np.float32))
    decode_latents(models.vae, latents, settings["decode_chunk_size"]).block_until_ready()
    start = time.perf_counter()
    decode_latents(models.vae, latents, settings["decode_chunk_size"]).block_until_ready()
    results.log("vae_decode_s", round(time.perf_counter() - start, 3))
    return models


def save_converted(results: Results, models) -> str:
    from svd_jax.train.checkpoints import save_models

    folder = os.path.join(os.environ["SVD_JAX_CACHE"], "converted-random")
    start = time.perf_counter()
    save_models(folder, {c: getattr(models, c) for c in ("image_encoder", "unet", "vae")})
    results.log("save_converted_s", round(time.perf_counter() - start, 2))
    return folder


def measure_warm_process(results: Results, args, folder: str) -> None:
    env = dict(os.environ)
    fraction = device_memory_limit_fraction(SMALL_CARD_GIB)
    if fraction:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = fraction
        results.log("warm_process_memory_limit_GiB", SMALL_CARD_GIB)
    child = subprocess.run([sys.executable, __file__, "--size", args.size, "--policy", args.policy,
                            "--attention", args.attention, "--warm-child", folder],
                           capture_output=True, text=True, env=env, timeout=args.child_timeout)
    for line in child.stdout.splitlines():
        if line.startswith("{"):
            for key, value in json.loads(line).items():
                results.log(key, value)
    if child.returncode:
        results.log("warm_process_error", child.stderr[-1500:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--policy", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto")
    parser.add_argument("--out", default=os.path.join("results", "svd_jax.json"))
    parser.add_argument("--child-timeout", type=float, default=240.0, help="seconds for the warm second process")
    parser.add_argument("--warm-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm_child:
        return warm_child(args)

    results = Results(args.out)
    device = jax.devices()[0]
    results.log("versions", {**{name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax")},
                             "svd_jax": svd_jax.__version__, "backend": jax.default_backend(),
                             "device": device.device_kind, "python": sys.version.split()[0]})
    results.log("settings", {"size": args.size, "policy": args.policy, "attention": args.attention, **SIZES[args.size]})
    os.environ["SVD_JAX_CACHE"] = tempfile.mkdtemp(prefix="svd_jax-bench-cache-")  # cold; the warm process reuses it
    svd_jax.enable_compilation_cache()
    models = results.section("generation", measure_generation, results, args)
    folder = models and results.section("save", save_converted, results, models)
    del models
    if folder:
        results.section("warm_process", measure_warm_process, results, args, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
