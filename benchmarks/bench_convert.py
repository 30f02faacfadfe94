"""Host memory and time of converting and loading a real-size SVD-XT checkpoint, on the CPU.

Makes a real-size original-layout file (``svd_xt.safetensors``: every key of the real one, float16, random
values; about 4.45 GiB) in a scratch folder, then measures, each step in a fresh process (peak resident size from
the kernel's ``ru_maxrss``, which counts the resident pages of memory-mapped files too):

1. converting the original file (``python -m convert``, sources hashed as by default);
2. exporting that converted folder as a diffusers folder (``--to-diffusers``, float16);
3. converting the diffusers folder;
4. ``svd_jax.load`` of the converted folder on the CPU with the float32 policy: resident size before and after
   loading, the peak, and a digest of every loaded parameter (to check that loading changes no bit).

The key set comes from diffusers' and OpenCLIP's models built on the meta device, renamed to the original layout
by the tests' own reading of the reference's rename rules (``tests/unet_helpers.py``, ``tests/vae_helpers.py``).

    python benchmarks/bench_convert.py --scratch /tmp/svd-bench --out results/convert.json
    python benchmarks/bench_convert.py --scratch /tmp/svd-bench --keep   # keep the files for another run

The scratch folder is deleted at the end unless ``--keep``: it holds about 9 GiB at its fullest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import Results  # noqa: E402

OPENCLIP = "conditioner.embedders.0.open_clip.model."
# OpenCLIP ViT-H/14's text-side parameters that stay in the original file (its text tower was deleted).
TEXT_LEFTOVERS = {"token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
                  "ln_final.weight": (1024,), "ln_final.bias": (1024,), "text_projection": (1024, 1024),
                  "logit_scale": ()}


def original_svd_xt_shapes() -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the original ``svd_xt.safetensors``."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from parity import load_open_clip_transformer
    from unet_helpers import sgm_block_names, to_sgm_key
    from vae_helpers import real_size_original_shapes

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()  # diffusers' defaults are SVD-XT's UNet
        visual = load_open_clip_transformer().VisionTransformer(
            image_size=224, patch_size=14, width=1280, layers=32, heads=16, mlp_ratio=4.0, output_dim=1024)
    blocks = sgm_block_names(4, 2, [True, True, True, False])
    shapes = {to_sgm_key(k, blocks): tuple(v.shape) for k, v in unet.state_dict().items()}
    shapes.update({OPENCLIP + "visual." + k: tuple(v.shape) for k, v in visual.state_dict().items()})
    shapes.update({OPENCLIP + k: s for k, s in TEXT_LEFTOVERS.items()})
    shapes.update(real_size_original_shapes(image_decoder=False))
    return shapes


def write_random_file(path: Path, shapes: dict[str, tuple[int, ...]], dtype=np.float16) -> int:
    """A safetensors file of random values (cut from one pre-drawn pool), written tensor by tensor."""
    from convert.export import write_safetensors

    pool = (np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(dtype)
    rng = np.random.default_rng(1)

    def tensors():
        for shape in shapes.values():
            n = int(np.prod(shape, dtype=np.int64))
            if n > pool.size:
                yield np.resize(pool, n).reshape(shape)
            else:
                start = int(rng.integers(0, pool.size - n + 1))
                yield pool[start:start + n].reshape(shape)

    write_safetensors(path, {k: (s, np.dtype(dtype)) for k, s in shapes.items()}, tensors(), {"format": "pt"})
    return path.stat().st_size


def measured_run(command: list[str]) -> dict:
    """Run ``command`` to its end; its wall and CPU time (user + system: less dependent on other processes on the
    machine), peak resident size (GiB) and the load average around it."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}  # a host-memory benchmark
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed with exit code {process.returncode}")
    return {"seconds": round(elapsed, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_GiB": round(usage.ru_maxrss / 2 ** 20, 2),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "output": output}


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 2 ** 20


def load_child(folder: str, components: list[str]) -> int:
    """In a fresh process: ``svd_jax.load(folder, components=...)`` on the CPU, float32; one JSON line of figures."""
    import jax
    from flax import nnx

    import svd_jax
    from svd_jax.checkpoint import path_key

    before = _rss_gib()
    start = time.perf_counter()
    models = svd_jax.load(folder, policy=svd_jax.Policy.float32(), components=components)
    seconds = time.perf_counter() - start
    after = _rss_gib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    digest, sizes = hashlib.sha256(), {}
    for component in components:
        leaves = nnx.to_flat_state(nnx.state(getattr(models, component), nnx.Param))
        sizes[component] = 0
        for path, var in sorted(leaves, key=lambda item: path_key(item[0])):
            array = var.get_value()
            assert isinstance(array, jax.Array) and array.dtype == np.float32, (path, type(array), array.dtype)
            host = np.asarray(array)
            digest.update(path_key((component, *path)).encode() + host.tobytes())
            sizes[component] += host.nbytes
    largest, params = max(sizes.values()) / 2 ** 30, sum(sizes.values()) / 2 ** 30
    print(json.dumps({"load_s": round(seconds, 1), "rss_before_load_GiB": round(before, 2),
                      "rss_after_load_GiB": round(after, 2), "peak_rss_during_load_GiB": round(peak, 2),
                      "params_GiB": round(params, 2), "largest_component_GiB": round(largest, 2),
                      "peak_minus_after_over_largest": round((peak - after) / largest, 3),
                      "peak_minus_before_and_params_GiB": round(peak - before - params, 2),
                      "params_sha256": digest.hexdigest()}), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", required=True, help="a folder outside the repository for the ~9 GiB of files")
    parser.add_argument("--out", default="results/convert.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--load-components", default="image_encoder,unet,vae",
                        help="the components to load (all three need about 10 GiB of memory)")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        return load_child(args.load_child, args.load_components.split(","))

    results = Results(args.out)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    source = scratch / "svd_xt.safetensors"
    try:
        if not source.is_file():
            start = time.perf_counter()
            shapes = original_svd_xt_shapes()
            results.log(None, "original_file_tensors", len(shapes))
            results.log(None, "original_file_GiB", round(write_random_file(source, shapes) / 2 ** 30, 3))
            results.log(None, "original_file_written_s", round(time.perf_counter() - start, 1))
        python = [sys.executable]
        steps = [
            ("convert_original", python + ["-m", "convert", str(source), str(scratch / "converted"), "--force"]),
            ("export_diffusers_fp16", python + ["-m", "convert", "--to-diffusers", str(scratch / "converted"),
                                                str(scratch / "diffusers"), "--dtype", "float16",
                                                "--accept-diffusers-eps", "--force"]),
            ("convert_diffusers_folder", python + ["-m", "convert", str(scratch / "diffusers"),
                                                   str(scratch / "converted_diffusers"), "--force"]),
        ]
        for name, command in steps:
            figures = measured_run(command)
            figures.pop("output")
            results.log(None, name, figures)
        shutil.rmtree(scratch / "diffusers")
        shutil.rmtree(scratch / "converted_diffusers")
        figures = measured_run(python + [__file__, "--scratch", str(scratch), "--load-child",
                                         str(scratch / "converted"), "--load-components", args.load_components])
        figures["peak_rss_with_digest_GiB"] = figures.pop("peak_rss_GiB")
        results.log(None, "load_float32", {**json.loads(figures.pop("output").strip().splitlines()[-1]), **figures})
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
