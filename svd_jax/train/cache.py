"""A disk cache of the frozen encoders' outputs, built once per dataset, model and frame size.

For every video, every frame's VAE posterior (mean and log-variance, float32, ``[T, h, w, C]``) and CLIP
embedding (``[T, D]``) are stored as ``.npy`` files and read by memory map. A clip then needs only its first
frame decoded (the conditioning frame is noise-augmented afresh every step, so its latent cannot be cached).
Clips come from the same :class:`~svd_jax.train.data.ClipSampler` as on the fly, so a cached run sees the same
clips. ``index.json`` records what the cache was built from; a cache built from something else is rebuilt.
Size: about 2 x 4 x h x w x C bytes per frame (147 kB at 576x1024).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from svd_jax import processes
from svd_jax.store import atomic_dir, atomic_file
from svd_jax.train.conditioning import ClipFeatures, encode_frames
from svd_jax.train.data import VideoClips, fit_frame, to_minus1_1

INDEX_FILE = "index.json"
ARRAYS = ("latent_mean", "latent_logvar", "image_embeds")
FORMAT = 1


@functools.partial(jax.jit, static_argnums=(0, 2))
def _encode(vae_graph, vae_state, encoder_graph, encoder_state, frames):
    return encode_frames(nnx.merge(vae_graph, vae_state), nnx.merge(encoder_graph, encoder_state), frames)


def _fingerprint(clips: VideoClips, model_id: str) -> dict:
    c = clips.config
    return {"format": FORMAT, "model": model_id, "height": c.height, "width": c.width,
            "videos": [[e.name, e.num_frames] for e in clips.entries]}


def _encode_video(entry, clips: VideoClips, encoders, folder: Path, chunk: int) -> None:
    (vae_graph, vae_state), (enc_graph, enc_state) = encoders
    c = clips.config
    with atomic_dir(folder, parents=True) as tmp:
        outputs = None
        frames = (fit_frame(im, c.height, c.width) for im in entry.frames())
        for start in range(0, entry.num_frames, chunk):
            block = [f for _, f in zip(range(chunk), frames)]
            n = len(block)
            padded = np.concatenate([np.stack(block), np.zeros((chunk - n, *block[0].shape), np.uint8)])
            results = jax.device_get(_encode(vae_graph, vae_state, enc_graph, enc_state, to_minus1_1(padded)))
            if outputs is None:
                outputs = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", np.float32,
                                                           (entry.num_frames, *r.shape[1:]))
                           for name, r in zip(ARRAYS, results)}
            for name, r in zip(ARRAYS, results):
                outputs[name][start:start + n] = r[:n]
        for array in outputs.values():
            array.flush()
        del outputs


def build_cache(clips: VideoClips, vae, image_encoder, cache_dir, model_id: str, chunk: int = 8,
                progress: bool = True) -> Path:
    """Encode every video of ``clips`` into ``cache_dir`` unless an up-to-date cache is there already. With
    several processes every process calls it: each encodes every ``process_count``-th video (with its local
    devices), and process 0 writes the index once all are done."""
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    fingerprint = _fingerprint(clips, model_id)
    index = cache_dir / INDEX_FILE
    if _read_index(index) == fingerprint:
        return cache_dir  # every process sees the same: the index is rewritten only after all have looked
    cache_dir.mkdir(parents=True, exist_ok=True)
    first, count = jax.process_index(), jax.process_count()
    if first == 0:
        index.unlink(missing_ok=True)
    encoders = (nnx.split(vae), nnx.split(image_encoder))
    share = list(enumerate(clips.entries))[first::count]
    for i, entry in tqdm(share, desc="caching latents", disable=not progress):
        _encode_video(entry, clips, encoders, cache_dir / f"{i:06d}", chunk)
    processes.wait_for_all(f"svd_jax.train.cache {cache_dir.absolute()}: encoded")
    if first == 0:
        with atomic_file(index) as scratch:  # the index marks the cache complete: written whole or not at all
            scratch.write_text(json.dumps(fingerprint))
    processes.wait_for_all(f"svd_jax.train.cache {cache_dir.absolute()}: indexed")
    return cache_dir


def _read_index(index: Path) -> dict | None:
    """The cache's fingerprint, or None when there is none or it is unreadable (then the cache is rebuilt)."""
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError):
        return None


class CachedClips:
    """``batch(position, batch_size)`` -> :class:`ClipFeatures` (numpy) from a cache built by :func:`build_cache`."""

    def __init__(self, clips: VideoClips, cache_dir, model_id: str):
        self.clips = clips
        self.cache_dir = Path(cache_dir)
        index = self.cache_dir / INDEX_FILE
        if _read_index(index) != _fingerprint(clips, model_id):
            raise ValueError(f"{self.cache_dir} is not an up-to-date latent cache for this data and model "
                             "(build it with build_cache)")
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    def _video(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._arrays:
            folder = self.cache_dir / f"{index:06d}"
            self._arrays[index] = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        return self._arrays[index]

    def batch(self, position: int, batch_size: int) -> ClipFeatures:
        refs = [self.clips.sampler(position + i) for i in range(batch_size)]
        means, logvars, embeds, firsts = [], [], [], []
        for ref in refs:
            arrays, frames = self._video(ref.video), self.clips.frame_indices(ref)
            means.append(arrays["latent_mean"][frames.start:frames.stop:frames.step])
            logvars.append(arrays["latent_logvar"][frames.start:frames.stop:frames.step])
            embeds.append(arrays["image_embeds"][ref.start])
            firsts.append(self.clips.read(ref, [ref.start])[0])
        fps_id, motion = self.clips.conditioning(refs)
        return ClipFeatures(np.stack(means), np.stack(logvars), np.stack(embeds), to_minus1_1(np.stack(firsts)),
                            fps_id, motion)
