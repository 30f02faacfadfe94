"""``svd_jax.batch``: each video equals the same job generated alone, a rerun skips what exists, a bad image fails
its job only, and jobs are split across processes exactly once each."""

import json

import numpy as np
import PIL.Image
import pytest

import svd_jax
from svd_jax import bulk
from svd_jax.bulk import Job, batch, process_share, read_jobs


def assert_same_video(frames, alone):
    """Equal to the job generated alone, up to float rounding: XLA sums a batch of two videos' convolutions in
    another order than one video's, which moves a handful of pixels (measured: 25 of 73,728) by one level."""
    difference = np.abs(frames.astype(int) - alone.astype(int))
    assert frames.shape == alone.shape and difference.max() <= 1 and np.mean(difference > 0) < 1e-3


# smaller videos than the tiny model's default (64x96, 4 frames): most of these tests is running the pipeline
SMALL = dict(num_inference_steps=1, height=32, width=32, num_frames=2)


def _frames(folder):
    return np.stack([np.asarray(PIL.Image.open(p)) for p in sorted(folder.glob("frame_*.png"))])


@pytest.fixture(scope="module")
def models():
    return svd_jax.load("tiny", policy=svd_jax.Policy.float32())


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        PIL.Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def test_batch_equals_single_generate_resumes_and_fails_a_bad_image_alone(tmp_path, images, models):
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    summary = batch(images, models, out, seed=10, suffix="", batch_size=2, progress=False, **SMALL)
    assert sorted(summary.done) == ["a", "b", "c"] and not summary.skipped
    assert list(summary.failed) == ["broken"] and "broken.png" in summary.failed["broken"]
    jobs = {job.output: job for job in read_jobs(images, seed=10, suffix="")}
    for name in ("a", "b", "c"):  # a, b generated together, c alone: each equals its job generated alone
        alone = svd_jax.generate(jobs[name].image, models, seed=jobs[name].seed, output_type="uint8",
                                 progress=False, **SMALL)[0]
        assert_same_video(_frames(out / name), alone)
        record = json.loads((out / f"{name}.json").read_text())
        assert record["seed"] == jobs[name].seed and record["num_inference_steps"] == 1
    written = json.loads((out / "batch-summary.json").read_text())
    assert sorted(written["done"]) == ["a", "b", "c"] and list(written["failed"]) == ["broken"]

    (out / "b.json").unlink()  # as if stopped between the video and its record
    calls = []
    original = bulk._generate_group
    bulk._generate_group = lambda *a: calls.append(a) or original(*a)
    try:
        again = batch(images, models, out, seed=10, suffix="", progress=False, **SMALL)
    finally:
        bulk._generate_group = original
    assert sorted(again.skipped) == ["a", "b", "c"] and not again.done and not calls
    assert json.loads((out / "b.json").read_text())["seed"] == jobs["b"].seed


def test_jobs_file_fields_and_refusals(tmp_path, images):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"image": "images/a.png", "output": "x.gif", "seed": 5, "motion_bucket_id": 30}\n'
                         '{"image": "images/b.png", "fps": 9}\n')
    first, second = read_jobs(jobs_file, seed=100)
    assert first == Job(str(images / "a.png"), "x.gif", 5, {"motion_bucket_id": 30})
    assert second == Job(str(images / "b.png"), "b.mp4", 101, {"fps": 9})
    csv_file = tmp_path / "jobs.csv"
    csv_file.write_text("image,output,num_frames\nimages/a.png,a.webp,3\nimages/c.png,,\n")
    assert [(j.output, j.settings) for j in read_jobs(csv_file)] == [("a.webp", {"num_frames": 3}), ("c.mp4", {})]
    for text, needle in (('{"image": "a.png", "colour": 1}\n', "unknown field 'colour'"),
                         ('{"image": "a.png"}\n{"image": "b/a.png"}\n', "as job 1 does"),
                         ('{"image": "a.png", "output": "a.avi"}\n', "unknown video extension"),
                         ("[1]\n", "not a JSON object")):
        jobs_file.write_text(text)
        with pytest.raises(ValueError, match=needle):
            read_jobs(jobs_file)


def test_processes_share_jobs_exactly_once():
    jobs = [Job(f"{i}.png", f"{i}.mp4", i) for i in range(7)]
    for count in (1, 2, 3, 8):
        shares = [process_share(jobs, i, count) for i in range(count)]
        assert sorted(j.seed for share in shares for j in share) == list(range(7))
