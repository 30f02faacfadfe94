"""generate refuses what would silently give a wrong video (NaN or infinity in the latents or the frames, numbers
that are not numbers, seeds that alias), and a device running out of memory is one line naming the stage and
what to lower. The tiny random model, at its own small sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import svd_jax
from svd_jax import pipeline
from svd_jax.cli import main as cli
from svd_jax.errors import NonFiniteError, OutOfMemory
from svd_jax.settings import seed_key, seeds

IMAGE = np.full((64, 96, 3), 0.5, np.float32)
# The sizes `svd-jax generate --model tiny` uses, so the command-line cases below reuse these compilations.
SMALL = dict(height=64, width=96, num_frames=4, num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def models():
    return svd_jax.load("tiny", policy=svd_jax.Policy.float32())


def test_seeds_are_64_bit_without_aliasing():
    def words(seed):
        return np.asarray(jax.random.key_data(seed_key(seed)))

    assert not np.array_equal(words(2 ** 32), words(0)) and not np.array_equal(words(2 ** 32 + 5), words(5))
    for seed in (0, 5, 2 ** 32 - 1):  # below 2**32, the same key (and videos) as before
        assert np.array_equal(words(seed), np.asarray(jax.random.key_data(jax.random.key(seed))))
    assert seeds(-1, 2) == [2 ** 64 - 1, 0] and seeds(2 ** 64 - 1, 1) == [2 ** 64 - 1]
    assert seeds([3, np.int64(4)], 2) == [3, 4]


@pytest.mark.parametrize("seed, message", [
    (1.5, "seed must be an integer or a list of integers (one per image), got 1.5"),
    ("abc", "seed must be an integer or a list of integers (one per image), got 'abc'"),
    (True, "seed must be an integer or a list of integers (one per image), got True"),
    ([1, "x"], "seed[1] must be an integer in [-2**63, 2**64), got 'x'"),
    (2 ** 64, f"seed must be an integer in [-2**63, 2**64), got {2 ** 64}"),
], ids=["float", "string", "bool", "list-item", "too-large"])
def test_bad_seeds_name_the_argument(seed, message):
    with pytest.raises(ValueError) as error:
        seeds(seed, 2)
    assert str(error.value) == message


@pytest.mark.parametrize("options, message", [
    (dict(image=[]), "image must be an image or a non-empty list of images, got an empty list"),
    (dict(noise_aug_strength=float("nan")), "noise_aug_strength must be a finite number, got nan"),
    (dict(fps=float("inf")), "fps must be a finite number, got inf"),
    (dict(seed=1.5), "seed must be an integer or a list of integers"),
], ids=["no-images", "nan-noise-aug", "inf-fps", "float-seed"])
def test_bad_arguments_fail_before_any_work(models, options, message):
    options = {"image": IMAGE, **SMALL, **options}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        svd_jax.generate(options.pop("image"), models, **options)


def test_cli_refuses_nan_noise_aug_strength(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "in.png")
    code = cli(["generate", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.gif"), "--model", "tiny",
                "--noise-aug-strength", "nan"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == "error: noise_aug_strength must be a finite number, got nan"
    assert [p.name for p in tmp_path.iterdir()] == ["in.png"]


@pytest.mark.parametrize("args, message", [
    (["--fps", "0"], "fps must be positive and finite, got 0"),
    (["--num-frames", "0"], "num_frames must be a positive integer, got 0"),
    (["--num-inference-steps", "-1"], "num_inference_steps must be a positive integer, got -1"),
    (["--decode-chunk-size", "0"], "decode_chunk_size must be a positive integer, got 0"),
    (["--window-size", "2", "--window-stride", "0"], "window_stride must be a positive integer, got 0"),
    (["--min-guidance-scale", "nan"], "guidance scales must be finite, got min_scale=nan, max_scale=3.0"),
    (["--seed", str(2 ** 70)], f"seed must be an integer in [-2**63, 2**64), got {2 ** 70}"),
    (["-o", "{tmp}/in.png/out.gif"], "output folder '{tmp}/in.png' is a file, not a folder"),
], ids=["fps", "frames", "steps", "chunk", "stride", "guidance", "seed", "parent-is-a-file"])
def test_cli_refuses_bad_numbers_before_loading(tmp_path, capsys, monkeypatch, args, message):
    """Numbers that cannot make a video are one line and exit 2 before any model is loaded (fps 0 used to fail
    only when the finished video was written)."""
    from PIL import Image

    from svd_jax import loader

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loader, "load", refuse)
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "in.png")
    args, message = [a.format(tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
    code = cli(["generate", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.gif"), "--model", "tiny", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1] == f"error: {message}", err
    assert [p.name for p in tmp_path.iterdir()] == ["in.png"]


def _identity_step(self, x, *args):
    return x


def _nan_step(self, x, *args):
    return x * jnp.nan


def _exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 19.50GiB.")


# The UNet step and the VAE decoder are replaced by stand-ins (the checks look at their outputs, whatever made
# them), so these cases compile only the small encoders.
def test_non_finite_latents_and_frames_are_refused(models, monkeypatch):
    monkeypatch.setattr(pipeline.Denoiser, "euler_step", _nan_step)
    with pytest.raises(NonFiniteError, match="the sampled latents hold NaN or infinity"):
        svd_jax.generate(IMAGE, models, seed=0, output_type="latent", **SMALL)
    with pytest.raises(NonFiniteError, match="the latents after step 1 hold NaN"):
        svd_jax.generate(IMAGE, models, seed=0, callback_on_step_end=pipeline.check_each_step, **SMALL)
    monkeypatch.setattr(pipeline.Denoiser, "euler_step", _identity_step)
    monkeypatch.setattr(pipeline, "decode_latents", lambda vae, latents, chunk: jnp.full(
        (latents.shape[1], 64, 96, 3), jnp.inf))
    with pytest.raises(NonFiniteError, match="the decoded frames hold NaN or infinity"):
        svd_jax.generate(IMAGE, models, seed=0, **SMALL)


@pytest.mark.parametrize("where, stage", [("sampling", "out of memory while sampling: lower num_frames"),
                                          ("decoding", "out of memory while decoding: lower decode_chunk_size")])
def test_out_of_memory_names_the_stage(models, monkeypatch, tmp_path, capsys, where, stage):
    if where == "sampling":
        monkeypatch.setattr(pipeline.Denoiser, "euler_step", _exhausted)
    else:
        monkeypatch.setattr(pipeline.Denoiser, "euler_step", _identity_step)
        monkeypatch.setattr(pipeline, "decode_latents", _exhausted)
    with pytest.raises(OutOfMemory) as error:
        svd_jax.generate(IMAGE, models, seed=0, **SMALL)
    assert str(error.value).startswith(stage) and isinstance(error.value, MemoryError)
    from PIL import Image

    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "in.png")
    code = cli(["generate", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.gif"), "--model", "tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: {stage}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


@pytest.mark.parametrize("argv, message", [
    (["extend", "{tmp}/empty.mp4", "-o", "{tmp}/out.mp4", "--frames", "2", "--model", "tiny"],
     "{tmp}/empty.mp4: cannot read the video (OSError: Could not load meta information: "),  # + ffmpeg's last line
    (["batch", "{tmp}/jobs.jsonl", "-o", "{tmp}/videos", "--model", "tiny"],
     "jobs file '{tmp}/jobs.jsonl' holds no jobs"),
    (["info", "{tmp}/in.png"], "{tmp}/in.png is a file, not a converted svd_jax folder"),
    (["clean", "{tmp}/missing"], "{tmp}/missing: no such folder"),
], ids=["unreadable-video", "no-jobs", "info-on-a-file", "clean-missing-folder"])
def test_cli_input_errors_are_one_line(tmp_path, capsys, argv, message):
    """Found by trying broken inputs: an unreadable video was reported with ffmpeg's whole log, an empty jobs
    file ran nothing with exit 0, `info` on a file said "no such folder", `clean` of a missing folder exit 0."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "jobs.jsonl").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli([a.format(tmp=tmp_path) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message.format(tmp=tmp_path)}"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before
