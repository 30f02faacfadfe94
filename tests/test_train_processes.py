"""``svd-jax train`` over 2 real processes (localhost coordinator, CPU collectives, 2 simulated devices each, one
4-device mesh, parameters and optimizer state split across all 4 devices): the losses equal one process's on the
same global batches, the checkpoint the processes saved together holds the whole state and the export gathered
exactly it, and a run restored from its checkpoint by a new pair of processes continues exactly as the
uninterrupted one."""

import json
import shutil
import subprocess
import sys

import numpy as np
from flax import nnx

import svd_jax
from parity import REPO
from svd_jax.checkpoint import path_key
from svd_jax.train.checkpoints import Checkpoints
from svd_jax.train.config import config_from_dict
from svd_jax.train.trainer import LossLog, Trainer
from test_batch_processes import _free_port, _process_env
from train_helpers import write_base_model, write_frame_folders

STEPS = 4
# One process on one device and 2 processes on a 4-device mesh sum the batch's losses and gradients in different
# orders, so the losses agree to float32 rounding, not bit for bit: measured 3.9e-7 relative at most over these
# steps (about 3 ulps; 1.9e-7 without the latent cache, 2.9e-7 with replicated parameters). The bound is 8 ulps:
# the rounding of one step carries into the next through the parameters.
LOSS_RTOL = 1e-6


def _values(base, data, out):
    # shard_params: FSDP over the mesh (a single device ignores it), so each process holds and saves only parts of
    # the larger parameters and their Adam moments, and the export gathers them. The latent cache is built by the
    # first pair (each process encoding half of the videos) and read by the later runs.
    return {"model": str(base), "output_dir": str(out), "steps": STEPS, "batch_size": 4, "seed": 5,
            "compute_dtype": "float32", "remat": False, "shard_params": True, "shard_min_size": 1024,
            "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1,
            "data": {"path": str(data), "num_frames": 3, "height": 32, "width": 32,
                     "cache_dir": str(data.parent / "cache")},
            "optimizer": {"learning_rate": 1e-3, "warmup_steps": 0}}


def _train_two_processes(config_file):
    port = _free_port()
    started = [subprocess.Popen([sys.executable, "-m", "svd_jax.cli", "train", str(config_file), "--no-progress",
                                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                                cwd=REPO, env=_process_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
               for i in range(2)]
    try:
        results = [p.communicate(timeout=600) for p in started]
    finally:
        for p in started:  # one failed: the other would wait for it at the next collective
            p.kill()
    assert [p.returncode for p in started] == [0, 0], [r[1][-3000:] for r in results]
    return results


def test_two_processes_train_as_one_and_resume_exactly(tmp_path):
    base, data = write_base_model(tmp_path / "base"), write_frame_folders(tmp_path / "data", videos=6, frames=4)
    values = _values(base, data, tmp_path / "two")
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps(values))

    out, _ = _train_two_processes(config_file)[0]
    assert "on 4 device(s) of 2 processes" in out
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["000000", "000001", "000002", "000003",
                                                                      "000004", "000005", "index.json"]
    two = LossLog(tmp_path / "two" / "losses.csv").read()
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert (tmp_path / "two" / "model" / "manifest.json").is_file()

    single = Trainer(config_from_dict({**values, "output_dir": str(tmp_path / "one")}), progress=False)
    one = single.run()
    errors = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(two, one)]
    print(f"losses, 2 processes: {[r['loss'] for r in two]}; 1 process: {[r['loss'] for r in one]}; "
          f"largest relative difference {max(errors):.2e}")
    assert max(errors) <= LOSS_RTOL
    # the step-4 checkpoint, restored here onto one device, is the whole state; the export is its parameters
    saved = Checkpoints(tmp_path / "two" / "checkpoints", keep=3)
    state, _, meta = saved.restore(STEPS, single.state, single.frozen)
    saved.close()
    exported = _unet_params(tmp_path / "two" / "model")
    assert meta["data_position"] == STEPS * 4 and int(state.step) == STEPS
    assert set(exported) == set(state.params)
    assert all(np.array_equal(exported[k], np.asarray(v)) for k, v in state.params.items())

    # a new pair of processes restores the step-2 checkpoint (its step-4 one removed) and continues exactly
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    config_file.write_text(json.dumps({**values, "output_dir": str(tmp_path / "resumed")}))
    out, _ = _train_two_processes(config_file)[0]
    assert "resuming at step 2" in out
    assert LossLog(tmp_path / "resumed" / "losses.csv").read() == two
    resumed = _unet_params(tmp_path / "resumed" / "model")
    assert all(np.array_equal(resumed[k], exported[k]) for k in exported)


def _unet_params(folder) -> dict:
    unet = svd_jax.load(folder, policy=svd_jax.Policy.float32(), components=["unet"]).unet
    return {path_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.split(unet, nnx.Param)[1])}
