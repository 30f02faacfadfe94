"""The fine-tuning round trip: a diffusers pipeline -> convert -> fine-tune a few steps -> export to diffusers ->
diffusers' UNet computes what svd_jax's fine-tuned UNet computes."""

import subprocess
import sys

import numpy as np
import torch
from diffusers import UNetSpatioTemporalConditionModel

import svd_jax
from parity import REPO, convert_inprocess, max_rel_err
from svd_jax.train.config import config_from_dict
from svd_jax.train.trainer import Trainer
from tiny_svd import tiny_pipeline
from train_helpers import write_frame_folders


def test_convert_finetune_export_load_in_diffusers(tmp_path):
    original = tiny_pipeline(seed=4)
    original.save_pretrained(tmp_path / "diffusers")
    convert_inprocess(tmp_path / "diffusers", tmp_path / "base", "--no-hash")
    data = write_frame_folders(tmp_path / "data", videos=2, frames=3)
    config = config_from_dict({
        "model": str(tmp_path / "base"), "output_dir": str(tmp_path / "out"), "steps": 3, "batch_size": 2, "seed": 0,
        "compute_dtype": "float32", "remat": False, "checkpoint_every": 1000, "log_every": 1,
        "data": {"path": str(data), "num_frames": 3, "height": 32, "width": 32},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 1},
    })
    trainer = Trainer(config, progress=False)
    trainer.run()
    finetuned = trainer.export()

    result = subprocess.run([sys.executable, "-m", "convert", "--to-diffusers", str(finetuned), str(tmp_path / "back")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    unet = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "back" / "unet").eval()
    moved = max(float((a - b).abs().max()) for a, b in zip(unet.state_dict().values(),
                                                             original.unet.state_dict().values()))
    assert moved > 1e-4  # the exported weights are the fine-tuned ones, not the base model's

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 8, 16, 16, generator=g)
    timestep = torch.tensor([0.3, -0.5])
    context = torch.randn(2, 1, 32, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [4.0, 30.0, 0.1]])
    with torch.no_grad():
        expected = unet(sample, timestep, context, ids).sample.permute(0, 1, 3, 4, 2).numpy()
    models = svd_jax.load(finetuned, policy=svd_jax.Policy.float32(), components=["unet"])
    actual = models.unet(sample.permute(0, 1, 3, 4, 2).numpy(), timestep.numpy(), context.numpy(), ids.numpy())
    assert max_rel_err(actual, expected) <= 1e-4
