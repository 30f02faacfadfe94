"""Packaging contracts: the runtime never imports torch; the command line entry points work."""

import subprocess
import sys

from parity import REPO


def test_import_does_not_import_torch():
    code = "import sys, svd_jax, svd_jax.image_encoder, svd_jax.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_cli_info(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from parity import randomize

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=1,
                              num_attention_heads=4, image_size=30, patch_size=10)
    randomize(CLIPVisionModelWithProjection(config)).save_pretrained(tmp_path / "image_encoder")
    from svd_jax.cli import main

    assert main(["convert", str(tmp_path / "image_encoder"), str(tmp_path / "dst"), "--no-hash"]) == 0
    cli = [sys.executable, "-m", "svd_jax.cli"]
    result = subprocess.run(cli + ["info", str(tmp_path / "dst")], cwd=REPO, capture_output=True, text=True, check=True)
    assert "image_encoder: clip_vision" in result.stdout and "hidden_size=32" in result.stdout
    missing = subprocess.run(cli + ["info", str(tmp_path / "nothing")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "nothing" in missing.stderr
