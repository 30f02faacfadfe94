"""``svd-jax batch`` over 2 real processes (localhost coordinator, CPU collectives, 2 simulated devices each):
every job's video equals the single-process one, a run stopped midway and started again finishes the rest without
redoing what was written, an unreadable image fails its job only, and process 0 writes the whole summary."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image

import svd_jax
from parity import REPO
from svd_jax.bulk import read_jobs
from test_batch import _frames, assert_same_video

NUM_JOBS = 6
# smaller videos than the tiny model's default (64x96, 4 frames): most of this test is running the pipeline
SIZE = ("--height", "32", "--width", "32", "--num-frames", "2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_env(devices: int) -> dict:
    """The environment of a process of a local multi-process run: CPU, ``devices`` simulated devices."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"}


def _start(jobs, out, port):
    return [subprocess.Popen([sys.executable, "-m", "svd_jax.cli", "batch", str(jobs), "-o", str(out), "--model",
                              "tiny", *SIZE, "--suffix", "", "--seed", "3", "--batch-size", "1", "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                             cwd=REPO, env=_process_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def test_two_processes_split_the_jobs_resume_and_match_one_process(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(NUM_JOBS):
        PIL.Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "9-broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"

    first = _start(images, out, _free_port())
    deadline = time.monotonic() + 300
    while not list(out.glob("?.json")) and time.monotonic() < deadline and first[1].poll() is None:
        time.sleep(0.2)
    for process in first:  # stopped midway: one process, then (as a cluster would) the other
        process.kill()
        process.wait()
    written = {p.stem: p.stat().st_mtime_ns for p in out.glob("?.json")}
    assert 0 < len(written) < NUM_JOBS and not (out / "batch-summary.json").exists()

    second = _start(images, out, _free_port())
    results = [p.communicate(timeout=500) for p in second]
    # job 7 (the broken one) is process 0's: its share failed one job, process 1's did all its own
    assert [p.returncode for p in second] == [1, 0], results
    summary = json.loads((out / "batch-summary.json").read_text())
    names = [str(i) for i in range(NUM_JOBS)]
    assert sorted(summary["done"] + summary["skipped"]) == names and sorted(summary["skipped"]) == sorted(written)
    assert list(summary["failed"]) == ["9-broken"]
    assert {p.stem: p.stat().st_mtime_ns for p in out.glob("?.json") if p.stem in written} == written

    models = svd_jax.load("tiny", policy=svd_jax.Policy.float32())
    for job in read_jobs(images, seed=3, suffix=""):
        if job.output != "9-broken":
            alone = svd_jax.generate(job.image, models, seed=job.seed, height=32, width=32, num_frames=2,
                                     output_type="uint8", progress=False)[0]
            assert_same_video(_frames(out / job.output), alone)
