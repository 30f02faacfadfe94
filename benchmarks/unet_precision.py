"""One full-size UNet evaluation in svd_jax's half-precision policies against diffusers in float32 (TF32 off).

The random diffusers UNet goes through the real converter; svd_jax evaluates the same input under each policy
(bf16 weights rounded, bf16 arithmetic; float32 as the port check) and the relative L2 error against the PyTorch
float32 output is reported. Needs torch and diffusers. Writes JSON to ``--out`` (default ``results/precision.json``).

    python benchmarks/unet_precision.py                  # SVD-XT UNet, on the default accelerator
    python benchmarks/unet_precision.py --size tiny      # seconds, on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import svd_jax

sys.path.insert(0, os.path.dirname(__file__))
from bench_generate import Results  # noqa: E402

# The SVD-XT UNet is diffusers' default; the tiny one is the shape of diffusers' own test UNet.
UNET_KWARGS = {
    "full": {},
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, num_attention_heads=(4, 8),
                 addition_time_embed_dim=32, projection_class_embeddings_input_dim=96, num_frames=2, sample_size=8,
                 down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                 up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
}
INPUT_SHAPE = {"full": (2, 25, 8, 72, 128), "tiny": (2, 3, 8, 16, 16)}  # CFG batch x frames x C x h x w


def torch_reference(size: str, folder: str):
    """Save a seeded random diffusers UNet to ``folder/unet``; return its inputs and float32 output (NHWC)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # built in place; .to() then moves the buffers the legacy constructors kept on the CPU
        unet = UNetSpatioTemporalConditionModel(**UNET_KWARGS[size]).to(device).eval()
    unet.save_pretrained(f"{folder}/unet")
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(*INPUT_SHAPE[size], generator=g), torch.tensor([1.0, 1.0]),
              torch.randn(2, 1, unet.config.cross_attention_dim, generator=g), torch.tensor([[6.0, 127.0, 0.02]] * 2))
    with torch.no_grad():
        expected = unet(*(x.to(device) for x in inputs)).sample
    expected = expected.permute(0, 1, 3, 4, 2).float().cpu().numpy()
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()
    sample, timestep, context, ids = (x.numpy() for x in inputs)
    return (sample.transpose(0, 1, 3, 4, 2), timestep, context, ids), expected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(UNET_KWARGS), default="full")
    parser.add_argument("--policies", default="bfloat16,float32,float16",
                        help="comma-separated svd_jax policies to evaluate, in order")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no further policy after this many seconds")
    parser.add_argument("--out", default=os.path.join("results", "precision.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = Results(args.out)
    from convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        inputs, expected = torch_reference(args.size, f"{tmp}/src")
        results.log("torch_reference_s", round(time.perf_counter() - start, 1))
        convert(f"{tmp}/src", f"{tmp}/dst", hash_sources=False)
        results.log("converted_s", round(time.perf_counter() - start, 1))
        forward = jax.jit(lambda unet, *a: unet(*a))

        def evaluate(name: str) -> None:
            policy = getattr(svd_jax.Policy, name)()
            unet = svd_jax.load(f"{tmp}/dst", policy=policy, components=["unet"]).unet
            sample, timestep, context, ids = inputs
            actual = forward(unet, jnp.asarray(sample, policy.compute), jnp.asarray(timestep),
                             jnp.asarray(context, policy.compute), jnp.asarray(ids, policy.compute))
            actual = np.asarray(actual, np.float32)
            results.log(f"{name}_rel_l2", float(np.linalg.norm(actual - expected) / np.linalg.norm(expected)))
            results.log(f"{name}_finite", bool(np.isfinite(actual).all()))
            results.log(f"{name}_done_s", round(time.perf_counter() - start, 1))

        for name in args.policies.split(","):
            if time.perf_counter() - start > args.budget_s:
                results.log(f"{name}_skipped", "time budget spent")
            else:
                results.section(name, evaluate, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
