"""Write generated frames to a video file: mp4 (H.264), animated gif or webp, or a folder of PNGs.

Every format is written to a hidden sibling of the destination named after the writing process
(:func:`svd_jax.store.scratch_path`) and renamed into place at the end, so a failed write leaves nothing behind
(and an existing file at the destination untouched), and what a killed writer left is removed by the next write
into that folder or ``svd-jax clean``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from svd_jax.errors import os_error_line
from svd_jax.store import atomic_dir, atomic_file, remove_stale_scratch, scratch_path

__all__ = ["FILE_FORMATS", "check_destination", "check_format", "check_fps", "discard_partial", "frames_to_uint8", "open_video",
           "read_video", "save_video", "write_settings"]

FILE_FORMATS = (".mp4", ".gif", ".webp")
H264_CRF = 18  # x264 constant-rate factor: 18 is visually near-lossless; imageio's default is 25.


def frames_to_uint8(frames) -> np.ndarray:
    """[F, H, W, 3] uint8 from an array (numpy or jax) or a list of [H, W, 3] frames.

    Float frames are taken as [0, 1]: clipped, then round(x * 255), as diffusers' postprocessing does.
    """
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is an empty list")
        arrays = [np.asarray(f) for f in frames]
        for i, a in enumerate(arrays):
            if a.shape != arrays[0].shape or a.dtype != arrays[0].dtype:
                raise ValueError(
                    f"frames[{i}] has shape {a.shape} and dtype {a.dtype}, "
                    f"frames[0] has {arrays[0].shape} and {arrays[0].dtype}"
                )
        if arrays[0].ndim != 3:
            raise ValueError(f"each frame in a list must be [H, W, 3], got shape {arrays[0].shape}")
        video = np.stack(arrays)
    else:
        video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] (RGB, channels last), got shape {video.shape}")
    if 0 in video.shape:
        raise ValueError(f"frames must not be empty, got shape {video.shape}")
    if video.dtype == np.uint8:
        return video
    if not (np.issubdtype(video.dtype, np.floating) or video.dtype.name == "bfloat16"):
        raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {video.dtype}")
    if video.dtype != np.float64:
        video = video.astype(np.float32)
    if not np.all(np.isfinite(video)):
        raise ValueError("frames contain NaN or infinite values")
    return np.round(np.clip(video, 0.0, 1.0) * 255).astype(np.uint8)


def _write_mp4(video: np.ndarray, path: Path, fps: float) -> None:
    """H.264 (libx264, yuv420p) through the ffmpeg binary that imageio-ffmpeg ships.

    yuv420p needs even sizes: an odd height or width is padded by one row/column repeating the edge
    pixels (no rescaling), so such a video decodes one pixel taller/wider than the frames.
    """
    import imageio_ffmpeg

    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    height, width = video.shape[1:3]
    rate = str(Fraction(fps).limit_denominator(1001))
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-n",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", rate, "-i", "-",
        "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(H264_CRF),
        "-movflags", "+faststart", "-f", "mp4", str(path),
    ]  # fmt: skip
    result = subprocess.run(cmd, input=np.ascontiguousarray(video).tobytes(), capture_output=True)
    if result.returncode != 0:
        lines = result.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
        raise RuntimeError(f"ffmpeg failed writing {path} (exit code {result.returncode}): {lines[-1][:500]}")


def _write_animated(video: np.ndarray, path: Path, fps: float, image_format: str) -> None:
    """Animated GIF (per-frame adaptive palette) or lossless animated WebP via pillow, looping forever.

    Encoders may merge identical consecutive frames into one longer frame; the timing is kept.
    """
    images = [Image.fromarray(frame) for frame in video]
    duration_ms = max(1, round(1000.0 / fps))
    options = {"lossless": True, "quality": 100, "method": 4} if image_format == "WEBP" else {}
    images[0].save(
        path, format=image_format, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, **options
    )


def _write_png_folder(video: np.ndarray, folder: Path) -> None:
    for i, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"frame_{i:05d}.png", format="PNG")


def _destination(path) -> tuple[Path, str]:
    """The final path and its format: a file extension in FILE_FORMATS, or "folder"."""
    text = os.fspath(path)
    if not text:
        raise ValueError("path is empty")
    is_folder = text.endswith(("/", os.sep))
    final = Path(text.rstrip("/" + os.sep) or text)
    suffix = final.suffix.lower()
    if is_folder or not suffix:
        return final, "folder"
    if suffix not in FILE_FORMATS:
        raise ValueError(
            f"unknown video extension {final.suffix!r} in {text!r}; use one of {', '.join(FILE_FORMATS)}, "
            "or a path without extension (or ending in '/') for a folder of PNG frames"
        )
    return final, suffix


def check_format(path) -> tuple[Path, str]:
    """The extension rule alone (no look at the disk): the final path and its format, or a ValueError."""
    return _destination(path)


def _settings_path(path) -> Path:
    final = Path(os.fspath(path).rstrip("/" + os.sep))
    return final.with_name(final.name + ".json")


def discard_partial(path) -> None:
    """Remove what this process's interrupted write of ``path`` (a video or its settings file) left behind: the
    scratch siblings that are renamed into place only when complete. The destination itself is never touched."""
    final, _ = _destination(path)
    for leftover in (scratch_path(final), scratch_path(final, keep_suffix=True), scratch_path(_settings_path(path))):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def write_settings(path, settings: dict) -> Path:
    """Write ``settings`` (how a video was made: seed, model, sampler settings) as JSON next to the video
    ``path`` as ``<path>.json``, atomically. Returns the JSON file's path."""
    target = _settings_path(path)
    with atomic_file(target) as temporary:
        temporary.write_text(json.dumps(settings, indent=2) + "\n")
    return target


def check_destination(path) -> tuple[Path, str]:
    """Validate an output path before any work is done: known format, existing parent folder, and no
    non-empty folder in the way. Returns the final path and its format (an extension or "folder")."""
    final, kind = _destination(path)
    if final.parent.exists() and not final.parent.is_dir():
        raise NotADirectoryError(f"output folder {str(final.parent)!r} is a file, not a folder")
    if not final.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(final.parent)!r} does not exist")
    if kind == "folder":
        if final.exists() and not final.is_dir():
            raise FileExistsError(f"{str(final)!r} exists and is not a folder")
        if final.is_dir() and any(final.iterdir()):
            raise FileExistsError(f"output folder {str(final)!r} exists and is not empty")
    elif final.is_dir():
        raise IsADirectoryError(f"{str(final)!r} is a folder, cannot write a {kind} file there")
    return final, kind


def check_fps(fps) -> None:
    """A video's frame rate: a positive finite number (checked before a command generates anything)."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not (0 < fps < math.inf):
        raise ValueError(f"fps must be positive and finite, got {fps!r}")


def save_video(frames, path: str | os.PathLike, fps: float = 7) -> Path:
    """Save frames [F, H, W, 3] (float in [0, 1] or uint8; array or list of frames) and return the path.

    The format follows the extension: `.mp4` (H.264, yuv420p), `.gif`, `.webp` (animated, lossless),
    or no extension / a trailing '/' for a folder of `frame_00000.png`, ... . The parent folder must
    exist. An existing file is replaced; an existing folder is replaced only when it is empty.
    """
    check_fps(fps)
    final, kind = check_destination(path)
    video = frames_to_uint8(frames)
    try:
        if kind == "folder":  # an existing (empty, checked above) folder is replaced once the frames are written
            with atomic_dir(final) as folder:
                _write_png_folder(video, folder)
        else:
            remove_stale_scratch(final.parent)  # what killed writers left here (atomic_dir does so for folders)
            with atomic_file(final, keep_suffix=True) as temporary:
                if kind == ".mp4":
                    _write_mp4(video, temporary, float(fps))
                else:
                    _write_animated(video, temporary, float(fps), "GIF" if kind == ".gif" else "WEBP")
    except (OSError, RuntimeError) as e:  # one line naming the file asked for, not the temporary one
        line = os_error_line(e) if isinstance(e, OSError) else str(e)
        written = scratch_path(final, keep_suffix=kind != "folder")
        raise type(e)(line.replace(str(written), str(final))) from e
    return final


def open_video(path):
    """imageio's ffmpeg reader for ``path``. imageio-ffmpeg starts ffmpeg with ``preexec_fn=os.setpgrp`` (to keep
    Ctrl-C from it) unless ``IMAGEIO_FFMPEG_NO_PREVENT_SIGINT`` is set; a ``preexec_fn`` makes Python fork the
    whole multithreaded process and run Python code in the child, which can deadlock with JAX's threads (JAX warns
    on every such fork). With the variable set (unless the user set it), ffmpeg is started without running Python
    in the child, and receives Ctrl-C with the training it serves."""
    import imageio.v2 as imageio

    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    return imageio.get_reader(path, format="ffmpeg")


def read_video(path) -> np.ndarray:
    """The frames ``[F, H, W, 3]`` (uint8 RGB) of a video: a file ffmpeg reads (.mp4, .webm, ...), an animated
    .gif or .webp, or a folder of frame images in name order (as :func:`save_video` writes them)."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
            if not files:
                raise ValueError(f"{path}: no frame images in the folder")
            frames = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        elif path.suffix.lower() in (".gif", ".webp"):
            from PIL import ImageSequence

            with Image.open(path) as image:
                frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
        else:
            with open_video(path) as reader:
                frames = [np.asarray(frame)[..., :3] for frame in reader]
    except ValueError:
        raise
    except Exception as e:  # PIL, imageio and ffmpeg raise many types for unreadable files
        # imageio's message carries ffmpeg's whole log: its first line and ffmpeg's last say what went wrong
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"
        raise ValueError(f"{path}: cannot read the video ({type(e).__name__}: {reason})") from None
    if not frames or any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"{path}: no frames, or frames of different sizes")
    return np.stack(frames).astype(np.uint8)
