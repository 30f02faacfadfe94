"""Training clips from a folder of videos (``.mp4``, ``.webm``, ``.mov``, ``.mkv``, ``.avi``, read with imageio's
ffmpeg plugin) or of frame folders (one sub-folder of ``.png``/``.jpg``/``.webp`` images per video, in name order).

Each clip is ``num_frames`` frames ``frame_stride`` apart from a random start, resized to cover ``height x
width`` and centre-cropped, in [-1, 1]; its first frame is the conditioning image. Per-clip frame rate and motion
bucket come from an optional ``metadata.json`` in the folder (``{"name": {"fps": 8, "motion_bucket_id": 90}}``,
keyed by file or folder name), else ``data.fps``, else the video file's rate (frame folders: 7), and
``data.motion_bucket_id`` (127). The frame rate of a clip is the source rate divided by ``frame_stride``; the UNet
is conditioned on its rounded value minus one.

Which clip comes at which position of the stream is a pure function of (seed, position): every epoch is a fresh
permutation of the videos and every clip a fresh start frame. So the data position (clips consumed so far) is
all a resumed run needs to continue with exactly the same clips, and with several processes each one reads the
clips of its own rows of the global batch (:func:`prefetch`'s ``rows``), which are those a single process would
have read at those rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import PIL.Image

from svd_jax.train.config import DataConfig
from svd_jax.video import open_video

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.json"
FRAME_FOLDER_FPS = 7.0


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    """One video of the folder: a video file or a folder of frames."""

    name: str
    path: Path
    num_frames: int
    fps: float
    motion_bucket_id: float
    frame_files: tuple[Path, ...] = ()

    def read(self, indices) -> list[PIL.Image.Image]:
        """The frames at ``indices`` (increasing) as RGB images."""
        if self.frame_files:
            return [_open_rgb(self.frame_files[i]) for i in indices]
        with open_video(self.path) as reader:
            return [PIL.Image.fromarray(np.asarray(reader.get_data(int(i)))).convert("RGB") for i in indices]

    def frames(self) -> Iterator[PIL.Image.Image]:
        """Every frame in order."""
        if self.frame_files:
            yield from (_open_rgb(f) for f in self.frame_files)
            return
        with open_video(self.path) as reader:
            for i, frame in enumerate(reader):
                if i == self.num_frames:
                    break
                yield PIL.Image.fromarray(np.asarray(frame)).convert("RGB")


def _open_rgb(path: Path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the frame ({e})") from None


def _video_info(path: Path) -> tuple[int, float]:
    try:
        with open_video(path) as reader:
            return int(reader.count_frames()), float(reader.get_meta_data().get("fps") or 0.0)
    except Exception as e:  # imageio/ffmpeg raise a variety of types for unreadable files
        raise ValueError(f"{path}: cannot read the video ({type(e).__name__}: {e})") from None


def _read_metadata(root: Path) -> dict:
    path = root / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        raise ValueError(f"{path} must map each video's name to {{\"fps\": ..., \"motion_bucket_id\": ...}}")
    return metadata


def scan(config: DataConfig) -> list[VideoEntry]:
    """Every video of ``config.path`` long enough for one clip, in name order."""
    root = Path(config.path)
    if not root.is_dir():
        raise ValueError(f"data.path {root} is not a folder")
    metadata = _read_metadata(root)
    span = (config.num_frames - 1) * config.frame_stride + 1
    entries, short = [], []
    for child in sorted(root.iterdir()):
        given = metadata.get(child.name, {})
        if child.is_dir():
            files = tuple(sorted(f for f in child.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
            if not files:
                continue
            count, file_fps = len(files), FRAME_FOLDER_FPS
        elif child.suffix.lower() in VIDEO_SUFFIXES:
            files = ()
            count, file_fps = _video_info(child)
        else:
            continue
        fps = float(given.get("fps") or config.fps or file_fps or FRAME_FOLDER_FPS)
        motion = float(given.get("motion_bucket_id", config.motion_bucket_id))
        if count < span:
            short.append(child.name)
            continue
        entries.append(VideoEntry(child.name, child, count, fps, motion, files))
    if short:
        warnings.warn(f"skipping {len(short)} video(s) shorter than {span} frames (num_frames "
                      f"{config.num_frames} x stride {config.frame_stride}): {', '.join(short[:5])}", stacklevel=2)
    if not entries:
        raise ValueError(f"data.path {root} holds no video or frame folder with at least {span} frames "
                         f"(videos: {', '.join(VIDEO_SUFFIXES)}; frame folders of {', '.join(IMAGE_SUFFIXES)})")
    return entries


def fit_frame(image: PIL.Image.Image, height: int, width: int) -> np.ndarray:
    """Resize (Lanczos) to cover ``height x width``, centre-crop: uint8 ``[height, width, 3]``."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(size, resample=PIL.Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)), np.uint8)


class ClipRef(NamedTuple):
    video: int  # index into the entries
    start: int  # first frame


class ClipSampler:
    """Position in the clip stream -> (video, start frame), a pure function of the seed and the position."""

    def __init__(self, entries: list[VideoEntry], config: DataConfig, seed: int):
        self.lengths = [e.num_frames for e in entries]
        self.span = (config.num_frames - 1) * config.frame_stride + 1
        self.seed = seed
        self._epoch_order = (None, None)  # the current epoch's order, drawn once (not a class-wide cache)

    def _order(self, epoch: int) -> np.ndarray:
        drawn, order = self._epoch_order  # read once: a prefetch thread may replace it meanwhile
        if drawn != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            self._epoch_order = (epoch, order)
        return order

    def __call__(self, position: int) -> ClipRef:
        epoch, index = divmod(int(position), len(self.lengths))
        video = int(self._order(epoch)[index])
        start = int(np.random.default_rng([self.seed, epoch, index, 1]).integers(
            0, self.lengths[video] - self.span + 1))
        return ClipRef(video, start)


class PixelBatch(NamedTuple):
    frames: np.ndarray  # [B, F, H, W, 3] float32 in [-1, 1]
    fps_id: np.ndarray  # [B] float32: the clip's frame rate minus one
    motion_bucket_id: np.ndarray  # [B] float32


def fps_id(entry: VideoEntry, frame_stride: int) -> float:
    return float(max(round(entry.fps / frame_stride), 1) - 1)


class VideoClips:
    """Decoded clips: ``batch(position, batch_size)`` -> :class:`PixelBatch` of the clips at positions
    ``position .. position + batch_size - 1``."""

    def __init__(self, config: DataConfig, seed: int):
        self.config = config
        self.entries = scan(config)
        self.sampler = ClipSampler(self.entries, config, seed)

    def frame_indices(self, ref: ClipRef) -> range:
        c = self.config
        return range(ref.start, ref.start + c.num_frames * c.frame_stride, c.frame_stride)

    def read(self, ref: ClipRef, indices) -> np.ndarray:
        """uint8 ``[len(indices), H, W, 3]``: frames of ``ref``'s video, resized and cropped."""
        images = self.entries[ref.video].read(indices)
        return np.stack([fit_frame(im, self.config.height, self.config.width) for im in images])

    def conditioning(self, refs: list[ClipRef]) -> tuple[np.ndarray, np.ndarray]:
        """``(fps_id [B], motion_bucket_id [B])`` float32 of the clips."""
        entries = [self.entries[r.video] for r in refs]
        return (np.array([fps_id(e, self.config.frame_stride) for e in entries], np.float32),
                np.array([e.motion_bucket_id for e in entries], np.float32))

    def batch(self, position: int, batch_size: int) -> PixelBatch:
        refs = [self.sampler(position + i) for i in range(batch_size)]
        frames = np.stack([self.read(r, self.frame_indices(r)) for r in refs])
        return PixelBatch(to_minus1_1(frames), *self.conditioning(refs))


def to_minus1_1(frames: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], as the pipeline prepares images: 2 * (x / 255) - 1."""
    return np.float32(2.0) * (frames.astype(np.float32) / np.float32(255.0)) - np.float32(1.0)


def prefetch(source, start_position: int, batch_size: int, rows: range | None = None,
             depth: int = 2) -> Iterator[tuple[int, object]]:
    """``(position, batch)`` for position = start, start + batch_size, ...: ``batch`` holds the clips at
    ``position + rows`` (default: all ``batch_size`` of them; a process of several reads its own rows of each
    global batch), read ``depth`` batches ahead in a background thread. The batches do not depend on the
    prefetching."""
    rows = range(batch_size) if rows is None else rows
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        position = start_position
        while True:
            while len(pending) < depth:
                pending.append((position, pool.submit(source.batch, position + rows.start, len(rows))))
                position += batch_size
            at, future = pending.pop(0)
            yield at, future.result()
