"""Video export: each format reads back with the right frames; bad input fails cleanly and leaves nothing."""

import os
import warnings

import imageio_ffmpeg
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageSequence

from svd_jax import video

NUM_FRAMES, HEIGHT, WIDTH = 5, 24, 40


def block_frames(seed=0, num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH):
    """uint8 frames of 4x4 blocks, 16 random colours per frame (so GIF palettes are exact), all distinct."""
    rng = np.random.default_rng(seed)
    palettes = rng.integers(0, 256, (num_frames, 16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (num_frames, -(-height // 4), -(-width // 4))).repeat(4, 1).repeat(4, 2)
    index = index[:, :height, :width]
    return np.stack([palettes[f][index[f]] for f in range(num_frames)])


def smooth_frames(num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH):
    """Float frames in [0, 1]: gradients whose colour changes with the frame index."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    return np.stack(
        [np.stack([x, y, np.full_like(x, f / max(1, num_frames - 1))], axis=-1) for f in range(num_frames)]
    ).astype(np.float32)


def read_pillow_animation(path):
    with Image.open(path) as im:
        frames, durations = [], []
        for frame in ImageSequence.Iterator(im):
            frames.append(np.asarray(frame.convert("RGB")))
            durations.append(frame.info.get("duration"))
        return np.stack(frames), durations


def read_mp4(path):
    # read_frames starts ffmpeg with a preexec_fn, so the fork runs JAX's at-fork warning hook.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(b, np.uint8).reshape(height, width, 3) for b in reader]
    return np.stack(frames), meta


def test_float_conversion_matches_diffusers_postprocessing():
    x = np.random.default_rng(1).uniform(-0.2, 1.2, (3, 4, 5, 3)).astype(np.float32)
    x[0, 0, :, 0] = [0.5 / 255, 1.5 / 255, 254.5 / 255, np.nextafter(np.float32(0.5 / 255), 0), 1.0]
    # diffusers clamps to [0, 1] in postprocess, then numpy_to_pil rounds.
    expected = np.stack([np.asarray(im) for im in VaeImageProcessor.numpy_to_pil(np.clip(x, 0, 1))])
    np.testing.assert_array_equal(video.frames_to_uint8(x), expected)


def test_accepts_jax_arrays_and_lists():
    frames = block_frames()
    np.testing.assert_array_equal(video.frames_to_uint8(jnp.asarray(frames)), frames)
    np.testing.assert_array_equal(video.frames_to_uint8(list(frames)), frames)
    as_bf16 = jnp.asarray(smooth_frames(), jnp.bfloat16)
    from_bf16 = video.frames_to_uint8(as_bf16)
    np.testing.assert_array_equal(from_bf16, video.frames_to_uint8(np.asarray(as_bf16, np.float32)))


@pytest.mark.parametrize("ext", [".gif", ".webp"])
def test_animated_pillow_formats_are_lossless_on_palette_frames(tmp_path, ext):
    frames = block_frames()
    path = video.save_video(frames, tmp_path / f"clip{ext}", fps=7)
    assert path == tmp_path / f"clip{ext}"
    decoded, durations = read_pillow_animation(path)
    assert decoded.shape == frames.shape
    np.testing.assert_array_equal(decoded, frames)
    expected_ms = 140 if ext == ".gif" else 143  # GIF stores centiseconds
    assert all(d == expected_ms for d in durations), durations
    assert os.listdir(tmp_path) == [f"clip{ext}"]


def test_webp_is_lossless_on_any_frames(tmp_path):
    frames = smooth_frames()
    decoded, _ = read_pillow_animation(video.save_video(list(frames), tmp_path / "clip.webp"))
    np.testing.assert_array_equal(decoded, video.frames_to_uint8(frames))


@pytest.mark.parametrize("trailing_slash", [True, False])
def test_png_folder(tmp_path, trailing_slash):
    frames = block_frames()
    target = str(tmp_path / "frames") + ("/" if trailing_slash else "")
    path = video.save_video(frames, target)
    assert path == tmp_path / "frames"
    names = sorted(os.listdir(path))
    assert names == [f"frame_{i:05d}.png" for i in range(NUM_FRAMES)]
    decoded = np.stack([np.asarray(Image.open(path / n)) for n in names])
    np.testing.assert_array_equal(decoded, frames)
    assert os.listdir(tmp_path) == ["frames"]


def test_mp4_decodes_to_the_frames(tmp_path):
    frames = video.frames_to_uint8(smooth_frames(num_frames=6, height=32, width=48))
    decoded, meta = read_mp4(video.save_video(frames, tmp_path / "clip.mp4", fps=7))
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert decoded.shape == frames.shape
    assert abs(meta["fps"] - 7) < 1e-6
    errors = np.abs(decoded.astype(int)[:, None] - frames.astype(int)[None]).mean(axis=(2, 3, 4))
    assert errors.diagonal().max() < 3.0, errors.diagonal()  # H.264 at crf 18 on smooth content
    assert (errors.argmin(axis=1) == np.arange(len(frames))).all()  # frame order and RGB order kept


def test_mp4_odd_size_is_edge_padded_to_even(tmp_path):
    frames = video.frames_to_uint8(smooth_frames(num_frames=3, height=23, width=37))
    decoded, _ = read_mp4(video.save_video(frames, tmp_path / "odd.mp4"))
    assert decoded.shape == (3, 24, 38, 3)
    err = np.abs(decoded[:, :23, :37].astype(int) - frames).mean()
    assert err < 3.0, err


def test_replaces_existing_file(tmp_path):
    path = tmp_path / "clip.gif"
    path.write_bytes(b"old")
    video.save_video(block_frames(), path)
    assert read_pillow_animation(path)[0].shape[0] == NUM_FRAMES


@pytest.mark.parametrize(
    "frames,match",
    [
        (np.zeros((4, 8, 3), np.uint8), r"\[F, H, W, 3\]"),
        (np.zeros((2, 4, 8, 4), np.uint8), r"\[F, H, W, 3\]"),
        (np.zeros((0, 4, 8, 3), np.uint8), "empty"),
        (np.zeros((2, 4, 8, 3), np.int64), "dtype"),
        (np.full((2, 4, 8, 3), np.nan, np.float32), "NaN"),
        ([], "empty"),
        ([np.zeros((4, 8, 3), np.uint8), np.zeros((4, 9, 3), np.uint8)], r"frames\[1\]"),
    ],
)
def test_bad_frames_raise(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        video.save_video(frames, tmp_path / "clip.gif")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf"), "7", True])
def test_bad_fps_raises(tmp_path, fps):
    with pytest.raises(ValueError, match="fps"):
        video.save_video(block_frames(), tmp_path / "clip.gif", fps=fps)


def test_unknown_extension_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\.avi"):
        video.save_video(block_frames(), tmp_path / "clip.avi")


@pytest.mark.parametrize("name", ["clip.mp4", "frames/"])
def test_missing_parent_folder_raises_and_is_not_created(tmp_path, name):
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        video.save_video(block_frames(), str(missing / name))
    assert os.listdir(tmp_path) == []


def test_non_empty_existing_folder_raises(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        video.save_video(block_frames(), tmp_path / "frames")
    assert os.listdir(tmp_path / "frames") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    video.save_video(block_frames(), tmp_path / "empty")
    assert len(os.listdir(tmp_path / "empty")) == NUM_FRAMES


def failing_after(monkeypatch, calls_before_failure):
    """Make PIL saves fail after `calls_before_failure` of them, each having written a partial file."""
    real_save = Image.Image.save
    count = {"n": 0}

    def save(self, fp, *args, **kwargs):
        if count["n"] >= calls_before_failure:
            with open(fp, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        count["n"] += 1
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("name,calls", [("clip.gif", 0), ("clip.webp", 0), ("frames", 2)])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, name, calls):
    (tmp_path / "other.txt").write_text("untouched")
    failing_after(monkeypatch, calls)
    with pytest.raises(OSError, match="disk full"):
        video.save_video(block_frames(), tmp_path / name)
    assert os.listdir(tmp_path) == ["other.txt"]


def test_failed_write_keeps_existing_destination(tmp_path, monkeypatch):
    (tmp_path / "clip.gif").write_bytes(b"previous video")
    failing_after(monkeypatch, 0)
    with pytest.raises(OSError):
        video.save_video(block_frames(), tmp_path / "clip.gif")
    assert os.listdir(tmp_path) == ["clip.gif"]
    assert (tmp_path / "clip.gif").read_bytes() == b"previous video"


def test_failed_ffmpeg_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "H264_CRF", "not-a-number")
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        video.save_video(block_frames(), tmp_path / "clip.mp4")
    assert os.listdir(tmp_path) == []


def test_write_errors_name_the_destination(tmp_path, monkeypatch):
    """A failed write is one line naming the file the caller asked for, never the temporary sibling."""
    failing_after(monkeypatch, 0)
    with pytest.raises(OSError) as error:
        video.save_video(block_frames(), tmp_path / "clip.gif")
    assert str(error.value) == f"{tmp_path / 'clip.gif'}: disk full" or str(error.value) == "disk full"
    monkeypatch.undo()
    monkeypatch.setattr(video, "H264_CRF", "not-a-number")
    with pytest.raises(RuntimeError) as error:
        video.save_video(block_frames(), tmp_path / "clip.mp4")
    assert str(tmp_path / "clip.mp4") in str(error.value) and ".partial" not in str(error.value)
    assert len(str(error.value).splitlines()) == 1
    assert os.listdir(tmp_path) == []
