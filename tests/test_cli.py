"""``svd-jax generate``: the tiny model end to end to a playable video, and bad input refused early."""

import subprocess
import sys
import time

import imageio_ffmpeg
import numpy as np
import PIL.Image
import pytest

from parity import REPO

CLI = [sys.executable, "-m", "svd_jax.cli", "generate"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    return path


def run(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_tiny_model_writes_a_playable_mp4(tmp_path, image):
    out = tmp_path / "x.mp4"
    result = run(image, "-o", out, "--model", "tiny", "--seed", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "noise" in result.stderr  # says plainly that the tiny model makes noise
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (96, 64) and len(frames) == 4


@pytest.mark.parametrize("args, needle", [
    (["{missing}", "-o", "{tmp}/x.mp4"], "missing.png"),
    (["{image}", "-o", "{tmp}/no/such/folder/x.mp4"], "does not exist"),
    (["{image}", "-o", "{tmp}/x.avi"], "unknown video extension"),
    (["{image}", "-o", "{tmp}/x.mp4", "--model", "{tmp}/not-converted"], "not-converted"),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, image, args, needle):
    filled = [a.format(tmp=tmp_path, image=image, missing=tmp_path / "missing.png") for a in args]
    started = time.monotonic()
    result = run(*filled, "--model" if "--model" not in filled else "--seed", "tiny" if "--model" not in filled else "1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert time.monotonic() - started < 60  # refused before any model work
    assert not any(p.name.startswith(("x.", ".x.")) for p in tmp_path.iterdir())


def test_converted_folder_missing_a_component(tmp_path, image):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from parity import convert_inprocess, randomize

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=1,
                              num_attention_heads=4, image_size=224, patch_size=32)
    randomize(CLIPVisionModelWithProjection(config)).save_pretrained(tmp_path / "image_encoder")
    convert_inprocess(tmp_path / "image_encoder", tmp_path / "only-clip", "--no-hash")
    result = run(image, "-o", tmp_path / "x.mp4", "--model", tmp_path / "only-clip")
    assert result.returncode == 2 and "has no unet, vae" in result.stderr, result.stderr
