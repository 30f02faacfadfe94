"""Where one denoising step's time goes: a device trace of the full-size SVD-XT step (CFG batch of 2 x 25 frames
at 576x1024, bf16), summarised by XLA op and by the svd_jax source line that emitted it.

    python benchmarks/profile_step.py --out results/        # writes step.xplane.pb and profile.txt there
    python benchmarks/profile_step.py --size tiny           # the same path in seconds, e.g. on a CPU

``step.xplane.pb`` opens in TensorBoard's or XProf's profile viewer; ``profile.txt`` is the summary printed here.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import svd_jax  # noqa: E402
from bench_generate import SIZES, build_models  # noqa: E402
from svd_jax import pipeline  # noqa: E402


def step_inputs(models, size: str):
    settings = SIZES[size]
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
    h, w = settings["height"] // scale, settings["width"] // scale
    frames = settings["num_frames"]
    dim = models.image_encoder.config.projection_dim
    key = jax.random.key(0)
    cond = pipeline.Conditioning(jax.random.normal(key, (2, 1, dim)), jax.random.normal(key, (2, h, w, 4)),
                                 jnp.asarray([[6.0, 127.0, 0.02]] * 2), jnp.linspace(1.0, 3.0, frames))
    return jax.random.normal(key, (1, frames, h, w, 4)), cond


def run_steps(fns, latents, cond, count: int):
    """``count`` steps from ``latents`` (donated: use the returned array) and their mean seconds."""
    start = time.perf_counter()
    for _ in range(count):
        latents = fns.step(latents, 700.0, 500.0, 1.6, cond)
    latents.block_until_ready()
    return latents, (time.perf_counter() - start) / count


def summarise(xplane: str, steps: int, top: int = 45) -> str:
    """Per-op and per-source-line device time of the traced steps, per step."""
    from jax.profiler import ProfileData

    by_op, by_source, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
    detail, total, layout = {}, 0.0, []
    planes = list(ProfileData.from_file(xplane).planes)
    on_device = any(plane.name.startswith("/device:") for plane in planes)
    for plane in planes:
        layout.append(f"{plane.name}: {[line.name for line in plane.lines][:12]}")
        if plane.name.startswith("/device:") != on_device:
            continue
        for line in plane.lines:
            if on_device and line.name != "XLA Ops":
                continue
            for event in line.events:
                stats = dict(event.stats)
                if not on_device and "hlo_op" not in stats:
                    continue
                ms = event.duration_ns / 1e6 / steps
                total += ms
                by_op[event.name] += ms
                detail.setdefault(event.name, stats)
                by_source[str(stats.get("source", stats.get("tf_op", "?")))[-90:]] += ms
                by_kind[str(stats.get("tf_op", event.name)).rsplit("/", 1)[-1][:60]] += ms
    out = [f"device time per step (XLA ops): {total:.1f} ms", *layout]
    for title, table in (("by kind", by_kind), ("by source", by_source), ("by op", by_op)):
        out.append(f"\n== {title} (ms per step)")
        for name, ms in table.most_common(top):
            extra = ""
            if table is by_op:
                s = detail[name]
                extra = f"  | {str(s.get('tf_op', ''))[-80:]} | {str(s.get('long_name', ''))[:160]}"
            out.append(f"{ms:9.2f}  {name}{extra}")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=3, help="steps traced")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    models = build_models(args.size, svd_jax.Policy.default())
    fns = pipeline._compiled(models, None)
    latents, cond = step_inputs(models, args.size)
    latents, seconds = run_steps(fns, latents, cond, 1)
    print(f"compile_and_first_step_s: {seconds:.1f}", flush=True)
    latents, seconds = run_steps(fns, latents, cond, 5)
    print(f"step_s: {seconds:.4f}", flush=True)
    trace_dir = tempfile.mkdtemp(prefix="svd_jax-trace-")
    jax.profiler.start_trace(trace_dir)
    latents, _ = run_steps(fns, latents, cond, args.steps)
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
