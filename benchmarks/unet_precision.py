"""Which precision policy to run on an accelerator: half precision against float32, in one call on one card.

A seeded random diffusers SVD-XT UNet goes through the real converter. At three noise levels (sigma 700, 1 and
0.002: the first, a middle and the last step's input, conditioned on the guided batch [uncond, cond]) it reports,
against diffusers' float32 output with TF32 off:

* the anchors: diffusers' own UNet in fp16 and in bf16, relative L2 and max-abs;
* svd_jax under each policy (float32: the port check; bfloat16, float16), the same, with non-finite counts, the
  seconds of the UNet on the guided batch (one denoising step's UNet work) and the compiled program's memory;
* a whole short generation per policy (the same converted UNet, random CLIP and VAE, injected noise) against the
  float32 port: final latents' relative L2, decoded frames' PSNR, and non-finite latents after every step.

Float32 evaluates one batch row per call (``--float32-rows``), so it fits in memory and time next to torch.
``default_policy`` is the fastest policy whose UNet error at every sigma is no larger than diffusers' fp16 error
and which stays finite everywhere (None if none qualifies). JSON: ``<device>-<date>-precision.json`` in ``--out``
(default ``benchmarks/results``), rewritten after every figure.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/unet_precision.py     # SVD-XT, on the accelerator
    python benchmarks/unet_precision.py --size tiny                             # seconds, on a CPU
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the card

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import svd_jax  # noqa: E402
from svd_jax import scheduler  # noqa: E402
from svd_jax.components import recast  # noqa: E402
from svd_jax.errors import NonFiniteError  # noqa: E402
from svd_jax.loader import random_models  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import RESULTS_DIR, NormalPool, Results, configs, results_path, test_image  # noqa: E402
from diffusers_baseline import UNET_KWARGS  # noqa: E402

SIGMAS = (700.0, 1.0, 0.002)
POLICIES = ("float32", "bfloat16", "float16")
UNET_LATENTS = {"full": (25, 72, 128), "tiny": (3, 16, 16)}  # frames, h, w: a 25-frame 576x1024 video's
GENERATION = {"full": dict(num_frames=14, height=320, width=576, num_inference_steps=10, decode_chunk_size=7),
              "tiny": dict(num_frames=3, height=32, width=32, num_inference_steps=3, decode_chunk_size=3)}
TORCH_DTYPES = {"float16": "fp16", "bfloat16": "bf16"}  # torch dtype: the name of its figures


def unet_inputs(size: str, sigma: float, context_dim: int, seed: int = 1):
    """The guided batch [uncond, cond] as the sampler feeds it at ``sigma``: channels-last numpy arrays
    ``(sample [2, F, h, w, 8], timestep [2], context [2, 1, D], added_time_ids [2, 3])``."""
    rng = np.random.default_rng(seed)
    f, h, w = UNET_LATENTS[size]
    noisy = rng.standard_normal((1, f, h, w, 4)) + sigma * rng.standard_normal((1, f, h, w, 4))
    scaled = np.asarray(scheduler.scale_model_input(jnp.asarray(noisy, jnp.float32), sigma))
    image_latents = np.broadcast_to(rng.standard_normal((1, 1, h, w, 4)), (1, f, h, w, 4))
    sample = np.concatenate([np.concatenate([scaled, np.zeros_like(image_latents)], -1),
                             np.concatenate([scaled, image_latents], -1)])
    context = np.concatenate([np.zeros((1, 1, context_dim)), rng.standard_normal((1, 1, context_dim))])
    timestep = np.full((2,), math.log(sigma) / 4)
    ids = np.asarray([[6.0, 127.0, 0.02]] * 2)
    return tuple(a.astype(np.float32) for a in (sample, timestep, context, ids))


def errors(actual, expected) -> dict:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    finite = np.isfinite(actual)
    diff = np.where(finite, actual - expected, 0.0)
    return {"rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(expected)), "max_abs": float(np.abs(diff).max()),
            "nonfinite": int((~finite).sum())}


def summarise(by_sigma: dict) -> dict:
    """Per-sigma errors plus the worst relative L2 over the sigmas and the non-finite total."""
    return {"rel_l2": max(e["rel_l2"] for e in by_sigma.values()),
            "nonfinite": sum(e["nonfinite"] for e in by_sigma.values()), "by_sigma": by_sigma}


def torch_unet(results: Results, size: str, folder: str, inputs: dict, float32_rows: int) -> dict:
    """Save the seeded random diffusers UNet to ``folder/unet``; record its fp16 and bf16 errors against its float32
    output; return the float32 outputs per sigma (channels-last)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # built in place; .to() then moves what the legacy constructors kept on the CPU
        unet = UNetSpatioTemporalConditionModel(**UNET_KWARGS[size]).to(device).eval()
    unet.save_pretrained(f"{folder}/unet")

    def run(dtype, rows: int) -> dict:
        outputs = {}
        for sigma, arrays in inputs.items():
            sample, timestep, context, ids = (torch.from_numpy(a).to(device) for a in arrays)
            sample = sample.permute(0, 1, 4, 2, 3)
            with torch.no_grad():
                out = torch.cat([unet(sample[i:i + rows].to(dtype), timestep[i:i + rows], context[i:i + rows].to(dtype),
                                      ids[i:i + rows].to(dtype)).sample for i in range(0, 2, rows)])
            outputs[sigma] = out.permute(0, 1, 3, 4, 2).float().cpu().numpy()
        return outputs

    expected = run(torch.float32, float32_rows)
    results.log(None, "torch_float32_s", round(time.perf_counter() - START, 1))
    for dtype, name in TORCH_DTYPES.items():
        unet.to(getattr(torch, dtype))
        actual = run(getattr(torch, dtype), 2)
        summary = summarise({str(s): errors(actual[s], expected[s]) for s in inputs})
        for key, value in summary.items():
            results.log("diffusers", f"{name}_{key}", value)
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return expected


def timed(fn, repeats: int = 2) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def svd_jax_unet(results: Results, name: str, converted: str, inputs: dict, expected: dict, rows: int) -> None:
    """One policy's UNet at every sigma against the torch float32 output, its guided-batch seconds and memory."""
    policy = getattr(svd_jax.Policy, name)()
    graph, state = nnx.split(svd_jax.load(converted, policy=policy, components=["unet"]).unet)

    @jax.jit
    def forward(state, sample, timestep, context, ids):
        return nnx.merge(graph, state)(sample.astype(policy.compute), timestep, context.astype(policy.compute),
                                       ids).astype(jnp.float32)

    some = next(iter(inputs.values()))
    compiled = forward.lower(state, *(a[:rows] for a in some)).compile()  # every call has these shapes
    memory = compiled.memory_analysis()
    if memory is not None:
        total = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
        results.log("svd_jax", f"{name}.unet_memory_gib", round(total / 2 ** 30, 2))

    def guided(arrays):
        return jnp.concatenate([compiled(state, *(jnp.asarray(a[i:i + rows]) for a in arrays))
                                for i in range(0, 2, rows)])

    summary = summarise({str(s): errors(guided(a), expected[s]) for s, a in inputs.items()})
    entry = {**summary, "seconds_per_step": round(timed(lambda: guided(some).block_until_ready()), 4),
             "rows_per_call": rows}
    for key, value in entry.items():
        results.log("svd_jax", f"{name}.{key}", value)


def whole_generation(results: Results, size: str, converted: str, others, reference: dict | None, name: str):
    """One policy's whole short video from the same injected noise; returns its latents and frames (the float32
    run is the reference of the others)."""
    policy = getattr(svd_jax.Policy, name)()
    unet = svd_jax.load(converted, policy=policy, components=["unet"]).unet
    encoder, vae = (recast(getattr(others, c), c, policy) for c in ("image_encoder", "vae"))
    models = svd_jax.SVDModels(others.path, policy, others.manifest, encoder, unet, vae)
    settings = GENERATION[size]
    scale = others.vae.config.downsample_factor
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((1, settings["num_frames"], settings["height"] // scale,
                                   settings["width"] // scale, 4)).astype(np.float32)
    noise = rng.standard_normal((1, settings["height"], settings["width"], 3)).astype(np.float32)
    nonfinite, steps = [], []

    def on_step(step, sigma, x):
        x = np.asarray(x)
        nonfinite.append(int((~np.isfinite(x)).sum()))
        steps.append(x)

    try:
        frames = svd_jax.generate(test_image(settings["height"], settings["width"]), models, latents=latents,
                                  noise=noise, seed=0, progress=False, callback_on_step_end=on_step, **settings)
    except NonFiniteError as e:  # generate refuses non-finite latents or frames: record how many, per step
        results.log("svd_jax", f"{name}.generation.nonfinite_per_step", nonfinite)
        results.log("svd_jax", f"{name}.generation.error", str(e))
        return None
    out = {"latents": steps[-1], "frames": np.asarray(frames, np.float32), "steps": steps}
    entry = {"nonfinite_per_step": nonfinite, "frames_nonfinite": int((~np.isfinite(out["frames"])).sum())}
    if reference is not None:
        entry["latents_rel_l2_per_step"] = [errors(a, b)["rel_l2"] for a, b in zip(steps, reference["steps"])]
        entry["latents_rel_l2"] = entry["latents_rel_l2_per_step"][-1]
        mse = float(np.mean((out["frames"] - reference["frames"]) ** 2))
        entry["frames_psnr_db"] = round(10 * math.log10(1.0 / mse), 2) if mse > 0 else float("inf")
    for key, value in entry.items():
        results.log("svd_jax", f"{name}.generation.{key}", value)
    return out


def default_policy(results: Results) -> str | None:
    """The fastest policy whose UNet error is within diffusers' fp16 error at every sigma and that never produced
    a non-finite value (UNet evaluations and the whole generation)."""
    anchor = results.get("diffusers", {}).get("fp16_by_sigma")
    if not anchor:
        return None
    qualifying = []
    for name, entry in results.get("svd_jax", {}).items():
        generation = entry.get("generation", {})
        if ("seconds_per_step" not in entry or entry.get("nonfinite") or "frames_nonfinite" not in generation
                or any(generation["nonfinite_per_step"]) or generation["frames_nonfinite"]):
            continue
        if all(entry["by_sigma"][s]["rel_l2"] <= anchor[s]["rel_l2"] for s in anchor):
            qualifying.append((entry["seconds_per_step"], name))
    return min(qualifying)[1] if qualifying else None


START = time.perf_counter()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(UNET_LATENTS), default="full")
    parser.add_argument("--policies", default=",".join(POLICIES), help="svd_jax policies, float32 first")
    parser.add_argument("--parts", default="unet,generation", help="unet (anchors and policies), generation")
    parser.add_argument("--float32-rows", type=int, choices=(1, 2), default=1,
                        help="batch rows per float32 UNet call (torch and svd_jax)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no further part after this many seconds")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for <device>-<date>-precision.json "
                                                            "(default benchmarks/results)")
    args = parser.parse_args(argv)
    policies, parts = args.policies.split(","), args.parts.split(",")
    device = jax.devices()[0]
    suffix = ("-tiny" if args.size == "tiny" else "") + "-precision"
    results = Results(results_path(args.out, device.device_kind, suffix))
    import importlib.metadata

    results.log(None, "device", device.device_kind)
    results.log(None, "versions", {name: importlib.metadata.version(name)
                                   for name in ("jax", "jaxlib", "flax", "torch", "diffusers")})
    results.log(None, "settings", {"size": args.size, "sigmas": SIGMAS, "unet_latents": UNET_LATENTS[args.size],
                                   "generation": GENERATION[args.size], "float32_rows": args.float32_rows})
    from convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        context_dim = UNET_KWARGS[args.size].get("cross_attention_dim", 1024)
        inputs = {sigma: unet_inputs(args.size, sigma, context_dim) for sigma in SIGMAS}
        expected = torch_unet(results, args.size, f"{tmp}/src", inputs, args.float32_rows)
        convert(f"{tmp}/src", f"{tmp}/dst", hash_sources=False)

        def within_budget(part: str) -> bool:
            if time.perf_counter() - START <= args.budget_s:
                return True
            results.log(None, f"{part}_skipped", "time budget spent")
            return False

        if "unet" in parts:
            for name in policies:
                if within_budget(f"unet_{name}"):
                    rows = args.float32_rows if name == "float32" else 2
                    results.section(None, f"unet_{name}", svd_jax_unet, results, name, f"{tmp}/dst", inputs,
                                    expected, rows)
        if "generation" in parts:
            # random CLIP and VAE of the matching size (the tiny CLIP's projection is the tiny UNet's context width)
            others = random_models({c: configs(args.size)[c] for c in ("image_encoder", "vae")},
                                   svd_jax.Policy.float32(), draw=NormalPool())
            reference = None
            for name in policies:
                if within_budget(f"generation_{name}"):
                    out = results.section(None, f"generation_{name}", whole_generation, results, args.size,
                                          f"{tmp}/dst", others, reference, name)
                    reference = reference or (out if name == "float32" else None)
    results.log(None, "default_policy", default_policy(results))
    results.log(None, "total_s", round(time.perf_counter() - START, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
