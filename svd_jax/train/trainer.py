"""The training loop: models, data, the jitted step, logging, checkpoints, sample videos and the final export.

``Trainer(config).run()`` trains until ``config.steps`` steps are done, resuming from the newest checkpoint in
``output_dir/checkpoints`` if there is one. It writes:

* ``output_dir/losses.csv``: one row per step (step, loss, grad_norm, learning_rate); on resume, rows after the
  restored step are dropped first, so the file is always one consistent history;
* ``output_dir/checkpoints/<step>/``: every ``checkpoint_every`` steps and at the end (see
  :mod:`svd_jax.train.checkpoints`); Ctrl-C waits for a save in progress, so the last one is complete;
* ``output_dir/samples/step-<step>.mp4``: every ``sample.every`` steps (if set);
* ``output_dir/model/``: the fine-tuned UNet with the base VAE and image encoder, loadable with
  :func:`svd_jax.load`; with ``[lora]``, ``output_dir/lora.safetensors`` instead: the adapters alone
  (:mod:`svd_jax.lora`), for ``svd_jax.load(base, lora=...)``.

Several processes (after ``jax.distributed.initialize()``, with a mesh over every process's devices) run the
same ``Trainer(config, mesh).run()``: each reads only its own rows of every batch, all of them save and restore
the sharded checkpoints together (orbax coordinates them; ``output_dir`` must be one folder every host sees), and
process 0 alone writes ``losses.csv`` and the exported model. Sample videos are written by a single process
only (with several, ``sample.every`` is ignored with a warning: export the model and generate from it).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from svd_jax import lora
from svd_jax.loader import SVDModels, load
from svd_jax.policy import Policy
from svd_jax.store import atomic_file, remove_stale_scratch
from svd_jax.train.cache import CachedClips, build_cache
from svd_jax.train.checkpoints import Checkpoints, save_models
from svd_jax.train.conditioning import ClipFeatures, encode_clips
from svd_jax.train.config import TrainConfig
from svd_jax.train.data import VideoClips, prefetch
from svd_jax.train.params import num_values, prepare_unet, training_policy
from svd_jax.train.placement import Layout, check_batch_size, gather_tree, local_rows, place_batch, place_tree
from svd_jax.train.step import TrainState, TrainStep, init_state

LOSS_COLUMNS = ("step", "loss", "grad_norm", "learning_rate")
LORA_FILE = "lora.safetensors"


@functools.partial(jax.jit, static_argnums=(0, 2))
def _encode_clips(vae_graph, vae_state, encoder_graph, encoder_state, frames, fps_id, motion_bucket_id):
    return encode_clips(nnx.merge(vae_graph, vae_state), nnx.merge(encoder_graph, encoder_state), frames, fps_id,
                        motion_bucket_id)


class LossLog:
    """``losses.csv``, appended step by step; ``truncate(step)`` drops the rows after ``step`` (rewriting the file
    atomically). A last line without its newline, what a run killed while appending leaves, is not a row. With
    ``writer=False`` (every process but the first of several) it reads but never writes."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = path
        self.writer = writer

    def truncate(self, step: int) -> None:
        if not self.writer:
            return
        rows = [r for r in self.read() if r["step"] <= step]
        with atomic_file(self.path) as scratch:
            self._write(rows, scratch, "w")

    def read(self) -> list[dict[str, float]]:
        if not self.path.is_file():
            return []
        text = self.path.read_text()
        complete = text[:text.rfind("\n") + 1]
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(io.StringIO(complete, newline=""))]

    def append(self, rows: list[dict[str, float]]) -> None:
        if self.writer:
            self._write(rows, self.path, "a")

    @staticmethod
    def _write(rows, path: Path, mode: str) -> None:
        new = mode == "w" or not path.is_file()
        with path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, LOSS_COLUMNS, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerows(rows)


class Trainer:
    """Builds everything from a :class:`TrainConfig`; ``mesh`` (:func:`svd_jax.sharding.make_mesh`) trains data
    parallel across its devices, with ``config.shard_params`` splitting parameters and optimizer state. With
    several processes the mesh must span every process's devices (``make_mesh()`` after
    ``jax.distributed.initialize()``) and every process runs the same calls."""

    def __init__(self, config: TrainConfig, mesh: Mesh | None = None, progress: bool = True):
        self.config = config
        self.mesh = mesh
        self.primary = jax.process_index() == 0  # the process that writes the files all processes share
        if jax.process_count() > 1 and (mesh is None or mesh.size != jax.device_count()):
            raise ValueError(f"with {jax.process_count()} processes the mesh must span all {jax.device_count()} "
                             "devices of all of them (svd_jax.sharding.make_mesh())")
        self.progress = progress and self.primary
        self.output = Path(config.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(self.output)  # what a killed run's export left (its checkpoints: Checkpoints)
        self.layout = Layout(mesh, config.shard_params, config.shard_min_size)
        check_batch_size(config.batch_size, self.layout)
        self.rows = local_rows(config.batch_size, self.layout)  # this process's rows of every batch
        if config.sample.every and jax.process_count() > 1 and self.primary:
            warnings.warn("sample.every is ignored with several processes (no sample videos are written); "
                          "generate from the exported model instead", stacklevel=2)

        # The frozen encoders run in float32 (as diffusers' force_upcast VAE encode), so the latents and embeddings
        # do not depend on compute_dtype.
        self.policy = training_policy(config)
        unet = load(config.model, policy=self.policy, components=["unet"], sharding=self.layout.param_sharder()).unet
        self.base = load(config.model, policy=Policy.float32(), components=["vae", "image_encoder"])
        self.base.require("vae", "image_encoder")
        self.base.unet = None
        self.unet, trainable, frozen = prepare_unet(unet, config)
        del unet  # its arrays live on in the training state only (each step donates and replaces them)
        self.vae_graph, self.vae_state = nnx.split(self.base.vae)
        self.encoder_graph, self.encoder_state = nnx.split(self.base.image_encoder)
        self.vae_state, self.encoder_state = (place_tree(s, self.layout, shard=False)
                                              for s in (self.vae_state, self.encoder_state))

        self.clips = VideoClips(config.data, config.seed)
        self.cached = None
        if config.data.cache_dir:
            encoders = {k: v for k, v in self.base.manifest.get("components", {}).items() if k != "unet"}
            model_id = f"{config.model} {json.dumps(encoders, sort_keys=True)}"
            build_cache(self.clips, self.base.vae, self.base.image_encoder, config.data.cache_dir, model_id,
                        progress=self.progress)
            self.cached = CachedClips(self.clips, config.data.cache_dir, model_id)

        self.step_fn = TrainStep(self.unet, self.base.vae, config.objective, config.optimizer, self.layout)
        self.state = place_tree(init_state(trainable, self.step_fn.optimizer, config.seed), self.layout)
        self.frozen = place_tree(frozen, self.layout)
        self.num_trainable, self.num_frozen = num_values(self.state.params), num_values(self.frozen)
        self.position = 0  # clips consumed
        self._step = 0
        self._sampler = None  # the Pipeline writing sample videos, made at the first one
        self.checkpoints = Checkpoints(self.output / "checkpoints", config.keep_checkpoints)
        self.log = LossLog(self.output / "losses.csv", writer=self.primary)
        latest = self.checkpoints.latest()
        self.restored_step = None if latest is None else self.restore(latest)
        if latest is None:
            self.log.truncate(0)

    # ---- state ------------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Completed steps, counted on the host (reading ``state.step`` would wait for the device)."""
        return self._step

    def restore(self, step: int) -> int:
        """Continue from checkpoint ``step`` (training state, frozen parameters, data position); later checkpoints
        and the loss log's rows after it are dropped."""
        state, self.frozen, meta = self.checkpoints.restore(step, self.state, self.frozen)
        self.checkpoints.discard_after(step)
        self.state = state if isinstance(state, TrainState) else TrainState(*state)
        self.position = int(meta["data_position"])
        self._step = int(self.state.step)
        self.log.truncate(step)
        return step

    def save_checkpoint(self) -> None:
        meta = {"data_position": self.position, "step": self.step, "config": self.config.to_dict()}
        self.checkpoints.save(self.step, self.state, self.frozen, meta)

    def unet_module(self, whole: bool = False):
        """The UNet with the current parameters, in inference mode (no adapter dropout; shares the state's arrays:
        use it before the next step). ``whole``: every array complete on this process (arrays split across
        processes are gathered: a collective, so every process calls it)."""
        params, frozen = (gather_tree(t) for t in (self.state.params, self.frozen)) if whole else (
            self.state.params, self.frozen)
        module = self.unet.merge(params, frozen)
        module.eval()
        return module

    # ---- data -------------------------------------------------------------------------------------------

    def features(self, batch) -> ClipFeatures:
        """The features of a batch (host arrays): this process's rows (:attr:`rows`) of the global batch."""
        size = len(batch[0]) * self.config.batch_size // len(self.rows)  # the global batch's (one process: batch's)
        if self.cached is not None:
            return place_batch(ClipFeatures(*(jnp.asarray(a) for a in batch)), self.layout, size)
        frames, fps_id, motion = place_batch(tuple(jnp.asarray(a) for a in batch), self.layout, size)
        return _encode_clips(self.vae_graph, self.vae_state, self.encoder_graph, self.encoder_state, frames, fps_id,
                             motion)

    # ---- loop -------------------------------------------------------------------------------------------

    def run(self, until: int | None = None) -> list[dict[str, float]]:
        """Train until ``until`` (default ``config.steps``) steps are done; returns this call's loss rows."""
        from tqdm.auto import tqdm

        c = self.config
        until = c.steps if until is None else until
        rows, pending = [], []
        source = self.cached if self.cached is not None else self.clips
        bar = tqdm(total=until, initial=self.step, desc="training", disable=not self.progress)
        batches = prefetch(source, self.position, c.batch_size, self.rows)
        start = time.perf_counter()
        try:
            while self.step < until:
                position, batch = next(batches)
                assert position == self.position, (position, self.position)
                self.state, metrics = self.step_fn(self.state, self.frozen, self.vae_state, self.features(batch))
                self.position += c.batch_size
                self._step += 1
                pending.append((self.step, metrics))
                step = self.step
                if step % c.log_every == 0 or step == until:
                    new = self._flush(pending)
                    rows += new
                    pending = []
                    bar.set_postfix(loss=f"{new[-1]['loss']:.4f}", lr=f"{new[-1]['learning_rate']:.2e}")
                bar.update(1)
                if step % c.checkpoint_every == 0 or step == until:
                    self.save_checkpoint()
                if c.sample.every and jax.process_count() == 1 and (step % c.sample.every == 0 or step == until):
                    self.write_sample()
        finally:
            rows += self._flush(pending)
            batches.close()
            bar.close()
            self.checkpoints.wait()
        if self.progress and rows:
            elapsed = time.perf_counter() - start
            print(f"{len(rows)} steps in {elapsed:.1f} s; last loss {rows[-1]['loss']:.5f}")
        return rows

    def _flush(self, pending) -> list[dict[str, float]]:
        rows = [{"step": step, **{k: float(v) for k, v in jax.device_get(m).items()}} for step, m in pending]
        if rows:
            self.log.append(rows)
        return rows

    # ---- outputs ----------------------------------------------------------------------------------------

    def models(self) -> SVDModels:
        """The fine-tuned models (the UNet shares the training state's arrays: use before the next step)."""
        return SVDModels(self.base.path, self.policy, self.base.manifest, self.base.image_encoder, self.unet_module(),
                         self.base.vae)

    def sample_image(self):
        from svd_jax.preprocess import load_image

        if self.config.sample.image:
            return load_image(self.config.sample.image)
        ref = self.clips.sampler(0)
        return load_image(self.clips.read(ref, [ref.start])[0])

    def write_sample(self, path=None) -> Path:
        from svd_jax.pipeline import Pipeline
        from svd_jax.video import save_video

        if jax.process_count() > 1:
            raise ValueError("sample videos are written by a single process; export the model and generate from it")
        c, s = self.config, self.config.sample
        path = Path(path) if path else self.output / "samples" / f"step-{self.step:07d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        fps = float(self.clips.conditioning([self.clips.sampler(0)])[0][0]) + 1
        if self._sampler is None:
            self._sampler = Pipeline(self.models(), self.mesh)
        else:  # the same pipeline (and what it prepared from the frozen encoders) with the current UNet weights
            self._sampler.models = self.models()
        frames = self._sampler(self.sample_image(), height=c.data.height, width=c.data.width,
                               num_frames=c.data.num_frames, num_inference_steps=s.num_inference_steps,
                               min_guidance_scale=s.min_guidance_scale, max_guidance_scale=s.max_guidance_scale,
                               fps=int(fps), seed=s.seed, output_type="uint8", progress=False)
        return save_video(frames[0], path, fps=fps)

    def export(self, destination=None) -> Path:
        """Write the fine-tuned models as a folder :func:`svd_jax.load` reads (default ``output_dir/model``), or
        with LoRA the adapters alone (default ``output_dir/lora.safetensors``, for ``load(base, lora=...)``).
        With several processes every process calls it (parameters split across them are gathered) and process 0
        writes; all return the path."""
        module = self.unet_module(whole=True)
        if self.config.lora.enabled:
            path = Path(destination) if destination else self.output / LORA_FILE
            if self.primary:
                base = {"model": str(self.config.model), "source": self.base.manifest.get("source"),
                        "converter_version": self.base.manifest.get("converter_version"),
                        "unet": self.base.manifest.get("components", {}).get("unet")}
                settings = {**dataclasses.asdict(self.config.lora), "steps": self.step}
                lora.save_adapters(path, module, settings, base)
            return path
        destination = Path(destination).absolute() if destination else (self.output / "model").absolute()
        if self.primary:
            note: dict[str, Any] = {"base_model": str(self.config.model), "steps": self.step,
                                    "trainable": self.config.optimizer.trainable}
            save_models(destination, {"image_encoder": self.base.image_encoder, "unet": module,
                                      "vae": self.base.vae}, note, self.base.manifest)
        return destination
