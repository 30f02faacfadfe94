"""Orbax checkpoints of the whole training state, and export of the fine-tuned model for ``svd_jax.load``.

A checkpoint ``<dir>/<step>/`` holds ``state`` (the trainable parameters, the optimizer state, the step counter
and the RNG key: :class:`~svd_jax.train.step.TrainState`), ``frozen`` (the frozen UNet parameters, so a
checkpoint does not depend on the base model staying unchanged) and ``meta`` (JSON: data position, config).
The last ``keep`` checkpoints are kept. Restoring places every array with the sharding of the abstract target,
so a run resumes on the same mesh layout, and resuming continues bit for bit: the data position, the RNG key and
the optimizer state are all restored.

A save killed outright (``kill -9``, a second Ctrl-C while the first waits for it) leaves orbax's unfinished
``<step>.orbax-checkpoint-tmp`` folder; the next run in that folder (:class:`Checkpoints`) and ``svd-jax clean``
remove it (:func:`remove_stale_temporaries`), unless a live run holds the folder (its lock file ``IN_USE``).
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from svd_jax.checkpoint import path_key
from svd_jax.store import atomic_dir, new_manifest, write_component, write_manifest


# In a checkpoint folder: every open Checkpoints holds a shared lock on it; removing unfinished saves takes an
# exclusive one, so it never touches a save a live run is writing. The kernel releases a dead process's lock.
IN_USE = ".svd_jax-in-use"


def remove_stale_temporaries(directory) -> list[Path]:
    """Remove the unfinished saves (as orbax recognises them: ``<step>.orbax-checkpoint-tmp``) from the checkpoint
    folder ``directory``, unless a live process has it open; returns what was removed. (Orbax's own
    ``cleanup_tmp_directories`` option removes them in a background thread, whatever other process is saving.)"""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    unfinished = [Path(temporary.get()) for temporary in ocp.utils.tmp_checkpoints(directory)]
    if not unfinished:
        return []
    with (directory / IN_USE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live run is using the folder: its save may be in flight
            return []
        for path in unfinished:
            shutil.rmtree(path, ignore_errors=True)
    return unfinished


class Checkpoints:
    """``save(step, state, frozen, meta)``, ``latest()``, ``restore(step, state_like, frozen_like)``,
    ``discard_after(step)``. Holds the folder (see ``IN_USE``) until :meth:`close` or until it is collected."""

    def __init__(self, directory, keep: int):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)
        self._in_use = (self.directory / IN_USE).open("a")
        fcntl.flock(self._in_use, fcntl.LOCK_SH)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, step: int, state, frozen: dict, meta: dict[str, Any]) -> None:
        """Start writing (asynchronously: the arrays are copied first, so training may go on at once)."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if frozen:  # orbax refuses empty trees
            items["frozen"] = ocp.args.StandardSave(frozen)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, state_like, frozen_like):
        """``(state, frozen, meta)``; ``*_like`` give the structure, dtypes and shardings (arrays or
        ``jax.ShapeDtypeStruct``s)."""
        self.manager.wait_until_finished()

        def abstract(tree):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                                tree)

        items = {"state": ocp.args.StandardRestore(abstract(state_like)), "meta": ocp.args.JsonRestore()}
        if frozen_like:
            items["frozen"] = ocp.args.StandardRestore(abstract(frozen_like))
        restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored["state"], (restored["frozen"] if frozen_like else {}), restored["meta"]

    def discard_after(self, step: int) -> None:
        """Delete the checkpoints of later steps (a run restored to ``step`` writes a new history after it)."""
        self.manager.wait_until_finished()
        for later in [s for s in self.steps() if s > step]:
            self.manager.delete(later)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
        self._in_use.close()


def _component_arrays(module) -> dict[str, np.ndarray]:
    _, params = nnx.split(module, nnx.Param)
    return {path_key(path): np.asarray(jax.device_get(var.get_value())) for path, var in nnx.to_flat_state(params)}


def save_models(destination, components: dict[str, Any], note: dict[str, Any] | None = None,
                base_manifest: dict[str, Any] | None = None) -> Path:
    """Write modules (``{"unet": ..., "vae": ..., "image_encoder": ...}``) as a converted folder that
    :func:`svd_jax.load` reads: per component ``config.json`` and an orbax ``params`` checkpoint in the modules'
    parameter dtypes, plus ``manifest.json`` (``note`` and the base model's source recorded under ``source``).
    Written with :func:`svd_jax.store.atomic_dir`: an existing folder is replaced only by a complete new one."""
    destination = Path(destination).absolute()
    base_manifest = base_manifest or {}
    manifest = new_manifest({"fine_tuned": note or {}, "base": base_manifest.get("source")},
                            base_manifest.get("converter_version"))
    with atomic_dir(destination, parents=True) as folder:
        for name, module in components.items():
            manifest["components"][name] = write_component(folder / name, module.config, _component_arrays(module),
                                                           "fine-tuned")
        write_manifest(folder, manifest)
    return destination
