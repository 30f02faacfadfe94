"""``svd-jax train CONFIG --plan`` on a tiny model: the plan's per-device figures are those of the step the
trainer runs (its real state and batch, lowered and compiled the same way), and bad plan options are refused."""

import json

import numpy as np
import jax
import pytest

from svd_jax.cli import main
from svd_jax.compile_plan import program_report
from svd_jax.train.config import config_from_dict
from svd_jax.train.plan import QUICK_COMPILE, parse_bytes
from svd_jax.train.trainer import Trainer
from train_helpers import write_base_model, write_frame_folders


def _write_config(root, base, data, **extra) -> tuple[dict, object]:
    values = {"model": str(base), "output_dir": str(root / "out"), "batch_size": 2, "compute_dtype": "bfloat16",
              "remat": "dots", "data": {"path": str(data), "num_frames": 3, "height": 32, "width": 32},
              "lora": {"rank": 4}, **extra}
    path = root / "train.json"
    path.write_text(json.dumps(values))
    return values, path


def test_plan_is_the_trainers_compiled_step(tmp_path, capsys):
    base = write_base_model(tmp_path / "base")
    data = write_frame_folders(tmp_path / "data", videos=1, frames=3)
    values, path = _write_config(tmp_path, base, data)
    assert main(["train", str(path), "--plan", "--budget", "1GiB", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "fits 1 GiB" in out and "LoRA rank 4" in out and "remat dots" in out
    (plan,) = json.loads((tmp_path / "plan.json").read_text())

    trainer = Trainer(config_from_dict(values), progress=False)
    features = trainer.features(trainer.clips.batch(0, 2))
    lowered = trainer.step_fn.lower(trainer.state, trainer.frozen, trainer.vae_state, features)
    report = program_report("train_step", lowered, 1, QUICK_COMPILE)
    for name in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "flops"):
        assert plan["step"][name] == getattr(report, name), name
    assert plan["step"]["temp_bytes"] > 0 and plan["step"]["flops"] > 0

    def nbytes(tree):
        return sum(a.nbytes for a in jax.tree.leaves(tree))

    assert plan["trainable_bytes"] == nbytes(trainer.state.params) > 0
    assert plan["optimizer_bytes"] == nbytes(trainer.state.opt_state)
    assert plan["frozen_bytes"] == nbytes(trainer.frozen)
    assert plan["input_bytes"] == nbytes(features) + nbytes(trainer.vae_state)
    assert plan["num_trainable"] == sum(a.size for a in jax.tree.leaves(trainer.state.params))
    assert {np.dtype(a.dtype).name for k, a in trainer.frozen.items() if k.endswith(".kernel")} == {"bfloat16"}
    assert plan["peak_bytes"] == report.peak_bytes and plan["fits"] is True


def test_bad_plan_options_are_refused(tmp_path, capsys):
    _, path = _write_config(tmp_path, "tiny", tmp_path)
    for argv, needle in [(["--plan", "--budget", "lots"], "--budget 'lots'"),
                         (["--plan", "--remat", "auto"], "give one"),
                         (["--budget", "80GiB"], "only with --plan"),
                         (["--plan", "--distributed"], "without --coordinator or --distributed"),
                         (["--single-device", "--distributed"], "--single-device trains in one process"),
                         (["--coordinator", "localhost:1"], "go together"),
                         (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
                          "--process-id must be in [0, 2)")]:
        assert main(["train", str(path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err
    assert parse_bytes("80GiB") == 80 * 2 ** 30 and parse_bytes("24GB") == 24 * 10 ** 9
    with pytest.raises(ValueError, match="converted folder or a preset"):
        from svd_jax.train.plan import model_configs

        model_configs(str(tmp_path))
