"""``svd-jax generate``: the tiny model end to end to a playable video, and bad input refused early."""

import json
import re
import signal
import subprocess
import sys
import threading
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


def test_tiny_model_writes_a_playable_mp4_and_its_seed(tmp_path, image):
    out = tmp_path / "x.mp4"
    result = run(image, "-o", out, "--model", "tiny")  # no --seed: a random one, printed and recorded
    assert result.returncode == 0, result.stderr[-2000:]
    assert "noise" in result.stderr  # says plainly that the tiny model makes noise
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (96, 64) and len(frames) == 4  # the tiny model's own settings
    printed = re.search(r"seed (\d+)", result.stderr)
    assert printed, result.stderr
    settings = json.loads((tmp_path / "x.mp4.json").read_text())
    assert settings["seed"] == int(printed.group(1)) and f"seed {settings['seed']}" in result.stdout
    assert (settings["height"], settings["width"], settings["num_frames"]) == (64, 96, 4)


def test_ctrl_c_exits_130_within_seconds_without_traceback(tmp_path, image):
    out = tmp_path / "x.mp4"
    process = subprocess.Popen([*CLI, str(image), "-o", str(out), "--model", "tiny", "--num-inference-steps", "1000",
                                "--seed", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr = bytearray()
    reader = threading.Thread(target=lambda: [stderr.extend(chunk) for chunk in iter(
        lambda: process.stderr.read1(4096), b"")], daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while b" 1/1000 " not in stderr and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the first step has finished: compiled and sampling
    assert b" 1/1000 " in stderr, stderr.decode(errors="replace")
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = process.wait(timeout=60)
    waited = time.monotonic() - sent
    reader.join(10)
    text = stderr.decode(errors="replace")
    assert code == 130, text[-2000:]
    assert waited < 10, f"exited {waited:.1f} s after Ctrl-C"
    assert "Traceback" not in text
    assert text.strip().splitlines()[-1].split("\r")[-1] == "interrupted", text[-500:]
    assert not any(p.name.startswith(("x.", ".x.")) for p in tmp_path.iterdir())  # nothing half-written


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


def test_tiny_loop_and_extend(tmp_path, image):
    looped = tmp_path / "loop.gif"
    result = run(image, "-o", looped, "--model", "tiny", "--loop", "--seed", "1", "--num-inference-steps", "1",
                 "--height", "32", "--width", "32", "--num-frames", "2")  # small: the pipeline's run is the cost
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "loop.gif.json").read_text())["loop"] is True
    longer = tmp_path / "longer.gif"
    extended = subprocess.run([sys.executable, "-m", "svd_jax.cli", "extend", str(looped), "-o", str(longer),
                               "--frames", "3", "--model", "tiny", "--num-inference-steps", "1", "--seed", "2"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert extended.returncode == 0, extended.stderr[-2000:]
    with PIL.Image.open(longer) as gif:
        assert gif.n_frames == 2 + 3
    missing = subprocess.run([sys.executable, "-m", "svd_jax.cli", "extend", str(tmp_path / "none.mp4"), "-o",
                              str(tmp_path / "x.gif"), "--frames", "2", "--model", "tiny"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error:") and not (tmp_path / "x.gif").exists()
