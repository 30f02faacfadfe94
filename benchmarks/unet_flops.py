"""UNet work per video for each sampler / step count / step-caching setting, from compiled programs' cost analysis.

Compiles (without running or allocating weights: the model is abstract) the full UNet evaluation and its shallow
branch (DeepCache-style step caching, ``cache_interval``) for the full-size SVD-XT CFG batch (2 x 25 frames at
576x1024, bf16) and prints FLOPs per evaluation and per video for each setting as a Markdown table.

    python benchmarks/unet_flops.py                  # full size; compiling on a CPU takes minutes
    python benchmarks/unet_flops.py --size tiny      # the same path in seconds
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from svd_jax import samplers
from svd_jax.components import abstract_model
from svd_jax.configs import UNetConfig
from svd_jax.policy import Policy

SIZES = {"svd_xt": (UNetConfig.svd_xt, 25, 576 // 8, 1024 // 8), "tiny": (UNetConfig.tiny, 4, 8, 12)}
# sampler, schedule, steps, cache interval: the defaults of the original code, then the cheaper choices
SETTINGS = [("euler", "karras", 25, 1), ("euler", "karras", 30, 1), ("heun", "karras", 25, 1),
            ("dpmpp_2m", "karras", 25, 1), ("dpmpp_2s_ancestral", "karras", 25, 1), ("euler", "ays", 10, 1),
            ("dpmpp_2m", "ays", 10, 1), ("euler", "karras", 25, 2), ("euler", "karras", 25, 3),
            ("euler", "karras", 25, 5), ("dpmpp_2m", "ays", 10, 2), ("lcm", "animatelcm", 4, 1)]


def compiled_flops(size: str) -> tuple[float, float]:
    """FLOPs of one full UNet evaluation and of one shallow-branch evaluation on the CFG batch."""
    config_fn, frames, h, w = SIZES[size]
    config = config_fn()
    graph, state = nnx.split(abstract_model("unet", config, Policy.bfloat16()))
    batch = 2  # [uncond, cond]
    sample = jax.ShapeDtypeStruct((batch, frames, h, w, config.in_channels), jnp.bfloat16)
    timestep = jax.ShapeDtypeStruct((batch,), jnp.float32)
    context = jax.ShapeDtypeStruct((batch, 1, config.cross_attention_dim[0]), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((batch, 3), jnp.float32)

    def full(state, *inputs):
        return nnx.merge(graph, state).call_with_deep_features(*inputs)

    def shallow(state, deep, *inputs):
        return nnx.merge(graph, state).call_with_deep_features(*inputs, deep_features=deep)[0]

    inputs = (sample, timestep, context, ids)
    full_program = jax.jit(full).lower(state, *inputs).compile()
    deep = jax.eval_shape(full, state, *inputs)[1]
    shallow_program = jax.jit(shallow).lower(state, deep, *inputs).compile()
    return full_program.cost_analysis()["flops"], shallow_program.cost_analysis()["flops"]


def table(full: float, shallow: float) -> list[dict]:
    rows = []
    for sampler, schedule, steps, interval in SETTINGS:
        evaluations = samplers.evaluations(sampler, steps)
        full_count = math.ceil(evaluations / interval)
        flops = full_count * full + (evaluations - full_count) * shallow
        rows.append(dict(sampler=sampler, schedule=schedule, steps=steps, cache_interval=interval,
                         evaluations=evaluations, full=full_count, shallow=evaluations - full_count,
                         tflop=flops / 1e12))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="svd_xt")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    full, shallow = compiled_flops(args.size)
    print(f"UNet on the CFG batch: full {full / 1e12:.2f} TFLOP, shallow branch {shallow / 1e12:.2f} TFLOP "
          f"({shallow / full:.1%})")
    rows = table(full, shallow)
    print("| sampler | schedule | steps | cache interval | UNet evaluations (full + shallow) | UNet TFLOP per video |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sampler']} | {r['schedule']} | {r['steps']} | {r['cache_interval']} | {r['evaluations']} "
              f"({r['full']} + {r['shallow']}) | {r['tflop']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(size=args.size, full_flops=full, shallow_flops=shallow, settings=rows), f, indent=2)


if __name__ == "__main__":
    main()
