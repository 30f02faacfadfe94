"""Data-parallel + FSDP training on a 4-device mesh (host platform devices, in a subprocess) computes the same
losses as one device, with the parameters and the Adam moments split across the devices."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    from svd_jax import sharding
    from svd_jax.train.config import config_from_dict
    from svd_jax.train.trainer import Trainer
    from train_helpers import write_base_model, write_frame_folders

    root = Path(sys.argv[1])
    base, data = write_base_model(root / "base"), write_frame_folders(root / "data", videos=4, frames=4)

    def config(out):
        return config_from_dict({
            "model": str(base), "output_dir": str(root / out), "steps": 3, "batch_size": 4,
            "compute_dtype": "float32", "remat": True, "shard_params": True, "log_every": 1,
            "shard_min_size": 1024,  # the tiny model's parameters are all below the default threshold
            "data": {"path": str(data), "num_frames": 3, "height": 32, "width": 32},
            "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0}})

    mesh = sharding.make_mesh(jax.devices())
    sharded = Trainer(config("mesh"), mesh=mesh, progress=False)
    mesh_losses = [r["loss"] for r in sharded.run()]
    single_losses = [r["loss"] for r in Trainer(config("one"), progress=False).run()]
    params, mu = sharded.state.params, sharded.state.opt_state[1][0].mu
    split = [k for k, v in params.items() if v.size >= 1024]
    report = {
        "devices": len(jax.devices()), "mesh": mesh_losses, "single": single_losses,
        "large": len(split),
        "split": sum(v.addressable_shards[0].data.size * 4 == v.size for k, v in params.items() if k in split),
        "mu_split": sum(mu[k].addressable_shards[0].data.size * 4 == mu[k].size for k in split),
        "exported": json.loads((sharded.export() / "manifest.json").read_text())["components"]["unet"]["num_params"],
    }
    print("REPORT" + json.dumps(report))
""")


@pytest.mark.skipif(os.environ.get("SVD_JAX_SLOW_TESTS") != "1",
                    reason="compiles the training step twice (about 90 s on 2 cores); SVD_JAX_SLOW_TESTS=1 runs it")
def test_data_parallel_fsdp_matches_one_device(tmp_path):
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)]), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                            cwd=tests.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT")[-1])
    print(report)
    assert report["devices"] == 4
    assert report["large"] > 10 and report["split"] == report["large"] and report["mu_split"] == report["large"]
    for mesh, single in zip(report["mesh"], report["single"]):
        assert abs(mesh - single) <= 1e-5 * abs(single)
    assert len(report["mesh"]) == 3 and report["exported"] == 485_485
