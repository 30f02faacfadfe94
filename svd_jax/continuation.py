"""``svd_jax.extend``: continue a finished video past its end, one clip at a time, conditioned on its last frame.

Each new clip is generated (the UNet's trained length by default) from the current last frame; the clip's first
``overlap`` frames are blended into the video's last ``overlap`` frames with weights rising linearly towards the
clip, and the rest is appended. SVD conditions on one image, so a continuation sees only the last frame: motion
may change direction at the seams, and drift accumulates clip after clip (the longer the video, the more).
For one consistent long clip, sample overlapping windows together instead (``generate(..., window_size=...)``).
"""

from __future__ import annotations

import numpy as np

from svd_jax.loader import SVDModels
from svd_jax.pipeline import Pipeline


def _as_frames(video) -> np.ndarray:
    frames = np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"video must be frames [F, H, W, 3] (one video), got shape {list(frames.shape)}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"video must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise ValueError("video has non-finite values")
    return np.clip(frames.astype(np.float32), 0.0, 1.0)


def extend(video, model: SVDModels | Pipeline, num_new_frames: int, *, overlap: int = 1,
           seed: int | None = None, num_frames: int | None = None, progress: bool = True, **generate_args):
    """``video [F, H, W, 3]`` (uint8, or float in [0, 1]) followed by ``num_new_frames`` generated frames:
    float32 ``[F + num_new_frames, H, W, 3]`` in [0, 1]. ``num_frames``: the length of each generated clip
    (default: the UNet's trained count); ``overlap`` (``0 <= overlap < num_frames``): how many of each clip's
    first frames are blended into the video instead of appended. Clip ``k`` uses ``seed + k`` (drawn once when
    ``seed`` is None). Other arguments (``num_inference_steps``, guidance, ``fps``, ``motion_bucket_id``, ...)
    are :func:`svd_jax.generate`'s; height and width are the video's. Extending by 0 frames returns the video.
    """
    frames = _as_frames(video)
    if isinstance(num_new_frames, bool) or not isinstance(num_new_frames, (int, np.integer)) or num_new_frames < 0:
        raise ValueError(f"num_new_frames must be a non-negative integer, got {num_new_frames!r}")
    pipeline = model if isinstance(model, Pipeline) else Pipeline(model)
    clip_frames = pipeline.models.unet.config.num_frames if num_frames is None else num_frames
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < clip_frames:
        raise ValueError(f"overlap must be an integer in [0, {clip_frames}) (the clip length), got {overlap!r}")
    for name in ("image", "height", "width", "output_type", "latents", "noise"):
        if name in generate_args:
            raise ValueError(f"extend sets {name} itself (from the video); do not pass it")
    if num_new_frames == 0:
        return frames
    seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else int(seed)
    height, width = frames.shape[1:3]
    out = list(frames)
    added, clip_index = 0, 0
    while added < num_new_frames:
        last = np.round(out[-1] * 255).astype(np.uint8)
        clip = pipeline(last, height=height, width=width, num_frames=clip_frames, seed=seed + clip_index,
                        output_type="np", progress=progress, **generate_args)[0]
        blend = min(overlap, len(out))
        for j in range(blend):
            weight = np.float32((j + 1) / (blend + 1))
            out[len(out) - blend + j] = (1 - weight) * out[len(out) - blend + j] + weight * clip[j]
        fresh = list(clip[overlap:overlap + num_new_frames - added])
        out.extend(fresh)
        added += len(fresh)
        clip_index += 1
    return np.stack(out).astype(np.float32)
