"""Multi-device generation on 8 simulated CPU devices equals single-device generation."""

import json
import os
import subprocess
import sys

from parity import REPO

SCRIPT = r"""
import json, sys
import numpy as np, jax
import svd_jax
from svd_jax import sharding
assert len(jax.devices()) == 8, jax.devices()
images = [np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8) for i in range(4)]
args = dict(num_frames=2, num_inference_steps=1, height=32, width=32, seed=[3, 4, 5, 6], progress=False)
single = svd_jax.generate(images, svd_jax.load("tiny", policy=svd_jax.Policy.float32()), **args)
mesh = sharding.make_mesh()
results = {}
for shard_params in (False, True):
    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    if shard_params:  # restore-time placement as load(..., sharding=...) does, applied to the in-memory state
        from flax import nnx
        graphdef, state = nnx.split(models.unet)
        sharder = sharding.param_sharder(mesh, shard_params=True, min_size=256)
        flat = {k: jax.device_put(v, sharder(".".join(map(str, k)), v.shape)) for k, v in nnx.to_flat_state(state)}
        state = nnx.from_flat_state(flat)
        models.unet = nnx.merge(graphdef, state)
        results["sharded_leaves"] = sum(1 for v in flat.values() if not v.sharding.is_fully_replicated)
    out = svd_jax.generate(images, models, mesh=mesh, **args)
    results[f"max_diff_shard_params_{shard_params}"] = float(np.abs(out - single).max())
# weights updated in place after a pipeline replicated them: its next call equals a new pipeline's
from flax import nnx
models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
pipe = svd_jax.Pipeline(models, mesh)
before = pipe(images, **args)
nnx.update(models.unet, jax.jit(lambda t: jax.tree.map(lambda a: a * 0.5, t))(nnx.state(models.unet, nnx.Param)))
after = pipe(images, **args)
results["update_changed"] = float(np.abs(after - before).max())
results["update_vs_new_pipeline"] = float(np.abs(after - svd_jax.generate(images, models, mesh=mesh, **args)).max())
print(json.dumps(results))
"""


def test_sharded_generation_equals_single_device():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # the pipeline's tolerance (frames in [0, 1]): splitting the batch only changes float summation order
    assert figures["max_diff_shard_params_False"] <= 1e-4, figures
    assert figures["max_diff_shard_params_True"] <= 1e-4, figures
    assert figures["sharded_leaves"] > 10, figures
    assert figures["update_changed"] > 1e-2 and figures["update_vs_new_pipeline"] == 0, figures


def test_param_sharder_rules():
    import jax

    from svd_jax import sharding

    mesh = sharding.make_mesh(jax.devices()[:1])
    replicate = sharding.param_sharder(mesh)
    assert tuple(replicate("w", (1024, 1024)).spec) == ()
    shard = sharding.param_sharder(mesh, shard_params=True)
    assert tuple(shard("w", (1280, 5120)).spec) == (None, "data")
    assert tuple(shard("b", (320,)).spec) == ()  # too small to be worth splitting
    assert tuple(sharding.rows(mesh, 3, 5).spec) == ("data", None, None, None, None)
