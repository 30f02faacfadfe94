"""Where one denoising step's time goes: a device trace of the full-size SVD-XT step (CFG batch of 2 x 25 frames
at 576x1024, bf16), summarised by XLA op and by the svd_jax source line that emitted it.

    python benchmarks/profile_step.py --out results/        # writes step.xplane.pb and profile.txt there
    python benchmarks/profile_step.py --size tiny           # the same path in seconds, e.g. on a CPU
    python benchmarks/profile_step.py --count               # FLOPs and bytes XLA counts for the step, on any machine

``step.xplane.pb`` opens in TensorBoard's or XProf's profile viewer; ``profile.txt`` is the summary printed here;
``--summarise step.xplane.pb`` prints it again from a saved trace (on any machine). ``--count`` compiles the step
from abstract weights (shapes only: nothing is allocated or run) for this machine's backend and prints XLA's
count of its floating-point operations and bytes accessed: work counted, not timed.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import svd_jax  # noqa: E402
from bench_generate import SIZES, build_models, configs  # noqa: E402
from svd_jax.denoiser import Conditioning  # noqa: E402


def step_inputs(models, size: str):
    settings = SIZES[size]
    scale = models.vae.config.downsample_factor
    h, w = settings["height"] // scale, settings["width"] // scale
    frames = settings["num_frames"]
    dim = models.image_encoder.config.projection_dim
    key = jax.random.key(0)
    cond = Conditioning(jax.random.normal(key, (2, 1, dim)), jax.random.normal(key, (2, h, w, 4)),
                                 jnp.asarray([[6.0, 127.0, 0.02]] * 2), jnp.linspace(1.0, 3.0, frames))
    return jax.random.normal(key, (1, frames, h, w, 4)), cond


def count_step(size: str, policy: svd_jax.Policy) -> dict:
    """XLA's cost analysis of the compiled guided step (UNet on [uncond, cond], guidance, Euler update) built from
    abstract weights: TFLOP and GB accessed per step. XLA counts a loop's body once, so the XLA attention's query
    blocks (``lax.map`` over the 9216-, 2304- and 576-token attentions) count as one block each; on a GPU,
    cuDNN's attention is a custom call XLA does not count at all."""
    from svd_jax.components import abstract_model

    unet = abstract_model("unet", configs(size)["unet"], policy)
    graph, state = nnx.split(unet)
    settings, scale = SIZES[size], configs(size)["vae"].downsample_factor
    h, w, frames = settings["height"] // scale, settings["width"] // scale, settings["num_frames"]
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.float32)
    cond = Conditioning(f32((2, 1, unet.config.cross_attention_dim[0])), f32((2, h, w, 4)), f32((2, 3)),
                        f32((frames,)))
    compiled = svd_jax.denoiser._euler_step.lower(graph, None, state, f32((1, frames, h, w, 4)), f32(()), f32(()),
                                                  f32(()), cond).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"backend": jax.default_backend(), "policy": policy.compute_dtype, "size": size,
            "tflop_per_step": round(cost["flops"] / 1e12, 3),
            "gb_accessed_per_step": round(cost.get("bytes accessed", float("nan")) / 1e9, 1)}


def run_steps(denoiser, latents, count: int):
    """``count`` steps from ``latents`` (donated: use the returned array) and their mean seconds."""
    start = time.perf_counter()
    for _ in range(count):
        latents = denoiser.euler_step(latents, 700.0, 500.0, 1.6)
    latents.block_until_ready()
    return latents, (time.perf_counter() - start) / count


def _kernel_kind(name: str) -> str:
    """A kernel or fusion name without its numbering: ``loop_multiply_fusion_104`` -> ``loop_multiply_fusion``."""
    return re.sub(r"[_.]\d+", "", name)[:80]


def _category(name: str) -> str:
    if "sdpa" in name or "flash" in name:
        return "attention (cuDNN)"
    if "fprop" in name or "conv" in name:
        return "convolution"
    if name.startswith(("nvjet", "gemm", "cublas", "cutlass")) or "gemm" in name:
        return "matmul"
    if name.startswith("input_"):
        return "reductions (norm statistics, softmax)"
    if name.startswith(("loop_", "wrapped_")):
        return "elementwise and layout"
    return "other fusions"


def summarise(xplane: str, steps: int, top: int = 40) -> str:
    """Device time per step of the traced steps, by kind of kernel and by kernel (fusion) name.

    On a GPU the kernels are the events of the compute streams (XLA runs the step as CUDA graphs, so the trace
    has no per-HLO-op line); on a CPU, the host threads' events that name an HLO op."""
    from jax.profiler import ProfileData

    by_kernel, calls = collections.Counter(), collections.Counter()
    planes = list(ProfileData.from_file(xplane).planes)
    on_device = any(plane.name.startswith("/device:") for plane in planes)
    for plane in planes:
        if plane.name.startswith("/device:") != on_device:
            continue
        for line in plane.lines:
            if on_device and not (line.name.startswith("Stream") and "Compute" in line.name):
                continue
            for event in line.events:
                if not on_device and "hlo_op" not in dict(event.stats):
                    continue
                by_kernel[event.name] += event.duration_ns / 1e6 / steps
                calls[event.name] += 1
    by_kind, by_category = collections.Counter(), collections.Counter()
    for name, ms in by_kernel.items():
        by_kind[_kernel_kind(name)] += ms
        by_category[_category(name)] += ms
    out = [f"device time per step: {sum(by_kernel.values()):.1f} ms in {sum(calls.values()) // steps} kernels"]
    out.append("\n== by category (ms per step)")
    out += [f"{ms:9.2f}  {name}" for name, ms in by_category.most_common()]
    out.append("\n== by kind (ms per step)")
    out += [f"{ms:9.2f}  {name}" for name, ms in by_kind.most_common(top)]
    out.append("\n== by kernel (ms per step, calls per step)")
    out += [f"{ms:9.2f} {calls[name] // steps:5d}  {name[:120]}" for name, ms in by_kernel.most_common(top)]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=3, help="steps traced")
    parser.add_argument("--out", default="results", help="folder for step.xplane.pb and profile.txt")
    parser.add_argument("--summarise", metavar="XPLANE", help="only print the summary of a saved trace")
    parser.add_argument("--count", action="store_true", help="only count the bf16 step's work (see above)")
    args = parser.parse_args(argv)
    if args.summarise:
        print(summarise(args.summarise, args.steps))
        return 0
    if args.count:
        print(json.dumps(count_step(args.size, svd_jax.Policy.bfloat16())), flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    models = build_models(args.size, svd_jax.Policy.default())
    latents, cond = step_inputs(models, args.size)
    denoiser = svd_jax.Pipeline(models).denoiser(cond)
    latents, seconds = run_steps(denoiser, latents, 1)
    print(f"compile_and_first_step_s: {seconds:.1f}", flush=True)
    latents, seconds = run_steps(denoiser, latents, 5)
    print(f"step_s: {seconds:.4f}", flush=True)
    trace_dir = tempfile.mkdtemp(prefix="svd_jax-trace-")
    jax.profiler.start_trace(trace_dir)
    latents, _ = run_steps(denoiser, latents, args.steps)
    jax.profiler.stop_trace()
    xplane = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    shutil.copy(xplane, os.path.join(args.out, "step.xplane.pb"))
    summary = summarise(xplane, args.steps)
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
