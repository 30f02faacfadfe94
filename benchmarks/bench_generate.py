"""svd_jax generation benchmark and its diffusers baseline, in one call on one accelerator: the single source of
the figures in benchmarks/README.md.

Full-size SVD-XT with random weights (speed does not depend on the values; no download), 25 frames at 576x1024,
25 steps, guidance on, decode chunk 8. Each part runs in a process of its own, with the card to itself:

1. ``cold``: a new process with an empty persistent compilation cache builds random weights and generates a whole
   video (its time from process start to the finished video, less building the weights, is
   ``cold_seconds_to_first_video``; the first step's and the decode's share are reported too); then seconds per
   video and per step, peak device memory, VAE decode seconds; then it saves the models as a converted folder.
2. ``warm``: a second process loads that folder with ``svd_jax.load`` (compilations from the persistent cache) and
   reports its time to the first step, then generates a whole video under a 20 GiB memory limit (a 24 GB card).
3. ``diffusers`` (``benchmarks/diffusers_baseline.py``): diffusers' pipeline eager in fp16, and its UNet under
   ``torch.compile`` (compile time reported apart), same settings.

The JSON, ``<device>-<date>.json`` in ``--out`` (default ``benchmarks/results``; ``-tiny`` added for ``--size
tiny``), is rewritten after every figure, so a run cut short keeps what it measured: ``{"device", "versions",
"settings", "svd_jax": {...}, "diffusers": {...}}``, with ``svd_jax.seconds_per_video``, ``seconds_per_step``,
``peak_device_gib``, ``cold_seconds_to_first_video`` and ``diffusers.seconds_per_video`` among them.

    python benchmarks/bench_generate.py                  # full size on the default accelerator
    python benchmarks/bench_generate.py --size tiny      # the same code path in seconds, e.g. on CPU
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: a process's time to first step includes them

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
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


def test_image(height: int, width: int) -> np.ndarray:
    return (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)


class Results(dict):
    """The run's figures, written to ``path`` as JSON after every figure. ``log("svd_jax", "seconds_per_video", v)``
    stores ``self["svd_jax"]["seconds_per_video"]``; a dotted key nests further (``"bfloat16.rel_l2"``); group
    None stores at the top level."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def log(self, group: str | None, key: str, value) -> None:
        *parents, leaf = key.split(".")
        target = self.setdefault(group, {}) if group else self
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
        print(f"{group + '.' if group else ''}{key}: {value}", flush=True)
        with open(self.path, "w") as f:
            json.dump(self, f, indent=1)

    def section(self, group: str | None, name: str, fn, *args):
        """Run one measurement; a failure is recorded and the next measurement still runs."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
            traceback.print_exc()
            self.log(group, f"{name}_error", f"{type(e).__name__}: {str(e)[:1000]}")
            return None


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_path(folder: str, device_kind: str, suffix: str = "") -> str:
    """``folder/<device>-<date><suffix>.json``, the device as a file name (``NVIDIA H200`` -> ``nvidia-h200``)."""
    device = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "device"
    return os.path.join(folder, f"{device}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}{suffix}.json")


def emit(key: str, value) -> None:
    """A child process's figure: one JSON line on stdout for the parent to record."""
    print(json.dumps({key: value}), flush=True)


def timed_video(models, size: str, **extra):
    """One whole video; returns (frames, seconds to it, perf_counter time the first step finished)."""
    first_step = []

    def on_step(step, sigma, latents):
        if step == 0:
            latents.block_until_ready()
            first_step.append(time.perf_counter())

    settings = {**SIZES[size], **extra}
    start = time.perf_counter()
    frames = svd_jax.generate(test_image(settings["height"], settings["width"]), models, seed=0, progress=False,
                              callback_on_step_end=on_step, **settings)
    return frames, time.perf_counter() - start, first_step[0] - start


def cold_child(args) -> int:
    """A new process, empty compilation cache: its first whole video, then the steady-state figures, then the
    converted folder for the warm process (``args.cold_child``)."""
    settings = SIZES[args.size]
    svd_jax.enable_compilation_cache()  # empty (the parent made it): this process fills it for the warm one
    start = time.perf_counter()
    models = build_models(args.size, policy_for(args))
    weights_s = time.perf_counter() - start
    emit("weights_s", round(weights_s, 2))
    frames, seconds, first_step = timed_video(models, args.size)
    emit("cold_seconds_to_first_video", round(time.time() - PROCESS_START - weights_s, 2))
    emit("cold_first_video_call_s", round(seconds, 2))
    emit("cold_first_step_s", round(first_step, 2))
    frames, seconds, _ = timed_video(models, args.size)
    emit("seconds_per_video", round(seconds, 3))
    emit("peak_device_gib", peak_gib())
    emit("frames_finite", bool(np.isfinite(frames).all()))
    emit("frames_mean", round(float(frames.mean()), 4))
    emit("black_frames", int((frames.reshape(frames.shape[1], -1).max(-1) < 1 / 255).sum()))

    step_times, last = [], [0.0]

    def on_step(step, sigma, latents):
        latents.block_until_ready()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    last[0] = time.perf_counter()
    svd_jax.generate(test_image(settings["height"], settings["width"]), models, seed=0, progress=False,
                     output_type="latent", callback_on_step_end=on_step, **settings).block_until_ready()
    emit("seconds_per_step", round(float(np.median(step_times[1:] or step_times)), 4))

    scale = models.vae.config.downsample_factor
    latents = jnp.asarray(np.random.default_rng(1).standard_normal(
        (1, settings["num_frames"], settings["height"] // scale, settings["width"] // scale, 4), np.float32))
    decode_latents(models.vae, latents, settings["decode_chunk_size"]).block_until_ready()
    start = time.perf_counter()
    decode_latents(models.vae, latents, settings["decode_chunk_size"]).block_until_ready()
    emit("vae_decode_s", round(time.perf_counter() - start, 3))

    from svd_jax.train.checkpoints import save_models

    start = time.perf_counter()
    save_models(args.cold_child, {c: getattr(models, c) for c in ("image_encoder", "unet", "vae")})
    emit("save_converted_s", round(time.perf_counter() - start, 2))
    return 0


def first_step(models, size: str) -> None:
    settings = {**SIZES[size], "num_inference_steps": 1}
    svd_jax.generate(test_image(settings["height"], settings["width"]), models, **settings, output_type="latent",
                     seed=0, progress=False).block_until_ready()


def warm_child(args) -> int:
    """The warm second process, as a user's: load the converted folder, first step (compilations from the
    persistent cache), then one whole video under the memory limit the parent set."""
    start = time.time()
    svd_jax.enable_compilation_cache()
    models = svd_jax.load(args.warm_child, policy=policy_for(args))
    loaded = time.time()
    first_step(models, args.size)
    done = time.time()
    first_step(models, args.size)  # the same work without loading programs: the first step's own share
    again = time.time() - done
    emit("warm_process_first_step_s", round(done - PROCESS_START, 2))
    emit("warm_imports_s", round(start - PROCESS_START, 2))
    emit("warm_load_s", round(loaded - start, 2))
    emit("warm_first_step_after_load_s", round(done - loaded, 2))
    emit("warm_same_step_again_s", round(again, 2))
    frames, seconds, _ = timed_video(models, args.size)
    emit("limited_memory_seconds_per_video", round(seconds, 2))
    emit("limited_memory_peak_device_gib", peak_gib())
    emit("limited_memory_frames_finite", bool(np.isfinite(frames).all()))
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


def run_child(results: Results, group: str, name: str, command: list[str], env: dict, timeout: float) -> None:
    """Run one part in its own process; record each JSON line it prints under ``group`` as it comes (a part cut
    short keeps what it measured), and its failure as ``<name>_error``."""
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        timed_out = threading.Event()
        watchdog = threading.Timer(timeout, lambda: (timed_out.set(), child.kill()))
        watchdog.start()
        try:
            for line in child.stdout:
                if line.startswith("{"):
                    for key, value in json.loads(line).items():
                        results.log(group, key, value)
            returncode = child.wait()
        finally:
            watchdog.cancel()
        if returncode:
            stderr.seek(0)
            cause = f"killed at the {timeout:.0f} s limit" if timed_out.is_set() else f"exit {returncode}"
            results.log(group, f"{name}_error", f"{cause}: {stderr.read()[-1500:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--policy", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto")
    parser.add_argument("--out", default=RESULTS_DIR,
                        help="folder for <device>-<date>.json (default benchmarks/results)")
    parser.add_argument("--baseline", choices=["compile", "eager", "none"], default="compile",
                        help="diffusers baseline: eager and torch.compile (default), eager only, or none")
    parser.add_argument("--child-timeout", type=float, default=900.0, help="seconds for each child process")
    parser.add_argument("--cold-child", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--warm-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_child:
        return cold_child(args)
    if args.warm_child:
        return warm_child(args)

    child_env = dict(os.environ)
    # This process only names the device and starts the others: it must not hold the card's memory.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    device = jax.devices()[0]
    results = Results(results_path(args.out, device.device_kind, "-tiny" if args.size == "tiny" else ""))
    results.log(None, "device", device.device_kind)
    results.log(None, "versions", {**{name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax")},
                                   "svd_jax": svd_jax.__version__, "backend": jax.default_backend(),
                                   "python": sys.version.split()[0]})
    results.log(None, "settings", {"size": args.size, "policy": args.policy, "attention": args.attention,
                                   **SIZES[args.size]})
    child_env["SVD_JAX_CACHE"] = tempfile.mkdtemp(prefix="svd_jax-bench-cache-")  # cold; the warm process reuses it
    folder = os.path.join(child_env["SVD_JAX_CACHE"], "converted-random")
    common = [sys.executable, __file__, "--size", args.size, "--policy", args.policy, "--attention", args.attention]
    run_child(results, "svd_jax", "cold", common + ["--cold-child", folder], child_env, args.child_timeout)
    if os.path.isdir(folder):
        warm_env = dict(child_env)
        fraction = device_memory_limit_fraction(SMALL_CARD_GIB)
        if fraction:
            warm_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = fraction
            results.log("svd_jax", "limited_memory_limit_gib", SMALL_CARD_GIB)
        run_child(results, "svd_jax", "warm", common + ["--warm-child", folder], warm_env, args.child_timeout)
    if args.baseline != "none":
        baseline = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_baseline.py"),
                    "--size", args.size, "--settings", json.dumps(SIZES[args.size])]
        if args.baseline == "eager":
            baseline.append("--no-compile")
        run_child(results, "diffusers", "baseline", baseline, child_env, args.child_timeout)
    ours, theirs = results.get("svd_jax", {}).get("seconds_per_video"), results.get("diffusers", {})
    for name, key in (("eager", "seconds_per_video"), ("compiled", "seconds_per_video_compiled")):
        if ours and theirs.get(key):
            results.log(None, f"time_over_diffusers_{name}", round(ours / theirs[key], 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
