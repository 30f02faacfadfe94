"""``svd_jax.show``: play generated videos inline in a Jupyter notebook.

Each video is encoded in memory (H.264 mp4 in an HTML5 ``<video>`` element, or an animated GIF in an ``<img>``)
and embedded as a data URL, so the notebook needs no files next to it and keeps the video when saved.
"""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from svd_jax.video import frames_to_uint8, save_video

FORMATS = ("mp4", "gif")


def _videos(frames) -> list[np.ndarray]:
    """[F, H, W, 3] uint8 per video from what ``generate`` returns: an array [B, F, H, W, 3] or [F, H, W, 3]
    (float in [0, 1] or uint8), or ``output_type="pil"``'s list of lists of PIL images (or one list)."""
    if isinstance(frames, (list, tuple)):
        if frames and isinstance(frames[0], Image.Image):
            frames = [frames]
        return [frames_to_uint8([np.asarray(f) for f in video]) for video in frames]
    array = np.asarray(frames)
    return [frames_to_uint8(v) for v in (array if array.ndim == 5 else array[None])]


def video_html(video: np.ndarray, fps: float = 7, format: str = "mp4", width: int | None = None) -> str:
    """One video [F, H, W, 3] uint8 as an HTML element with the encoded video inline."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    size = f' width="{width}"' if width else ""
    if format == "gif":
        buffer = io.BytesIO()
        images = [Image.fromarray(frame) for frame in video]
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, round(1000 / fps)), loop=0)
        data = base64.b64encode(buffer.getvalue()).decode()
        return f'<img src="data:image/gif;base64,{data}"{size}/>'
    with tempfile.TemporaryDirectory() as folder:
        data = base64.b64encode(save_video(video, Path(folder) / "video.mp4", fps=fps).read_bytes()).decode()
    return f'<video controls autoplay loop muted playsinline{size} src="data:video/mp4;base64,{data}"></video>'


def show(frames, fps: float = 7, format: str = "mp4", width: int | None = None) -> None:
    """Play videos inline in Jupyter: ``frames`` as ``generate`` returns them (any ``output_type`` but
    ``"latent"``: every video of a batch is shown), ``fps`` the playback rate, ``format`` ``"mp4"`` (an HTML5
    video with controls, looping) or ``"gif"`` (an animated image), ``width`` the display width in pixels
    (default: the video's own)."""
    from IPython.display import HTML, display

    display(HTML("".join(video_html(v, fps, format, width) for v in _videos(frames))))
