"""Orbax reading and writing in bounded host memory.

Orbax's defaults hold a second copy of everything on the host while they save or restore: the numpy handler
deep-copies every array before writing it, then writes (and compresses) all of them at once, and a restore reads
every array at once before placing it. The checkpointers here move at most :data:`IN_FLIGHT_BYTES` at a time (or
twice the largest array, if that is more), write numpy arrays without copying them, and accept
:class:`DeferredArray` leaves, read only when their turn to be written comes: a converter can write a component
it never holds in memory. What they write is an ordinary orbax checkpoint of numpy arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

# Bytes a checkpointer reads or writes at once.
IN_FLIGHT_BYTES = 1 << 26


class _BytesInFlight:
    """At most ``limit`` bytes between ``async with gate(n):`` entries (one larger entry runs alone)."""

    def __init__(self, limit: int):
        self.available = self.limit = limit
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def __call__(self, nbytes: int):
        nbytes = min(nbytes, self.limit)
        async with self.changed:
            await self.changed.wait_for(lambda: self.available >= nbytes)
            self.available -= nbytes
        try:
            yield
        finally:
            async with self.changed:
                self.available += nbytes
                self.changed.notify_all()


@dataclasses.dataclass(frozen=True)
class DeferredArray:
    """An array a :func:`writer` reads only when it writes it: ``read()`` returns a numpy array of ``shape`` and
    ``dtype``, and the array is dropped once written."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[], np.ndarray]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def materialize(self) -> np.ndarray:
        array = self.read()
        if array.shape != tuple(self.shape) or array.dtype != self.dtype:
            raise AssertionError(f"read {array.dtype}{list(array.shape)}, announced {self.dtype}{list(self.shape)}")
        return array


class _StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler, writing numpy and deferred arrays without a copy and at most ``limit`` bytes at once
    (a deferred array is read when its turn comes). Both are stored as numpy arrays."""

    def __init__(self, limit: int):
        super().__init__(deepcopy_host_arrays=False)
        self._limit = limit
        self.read_error: Exception | None = None

    async def _background_serialize(self, values, infos, args=None):
        self._gate = _BytesInFlight(self._limit)  # made here: it belongs to the event loop that writes
        await super()._background_serialize(values, infos, args)

    async def _open_and_write(self, value: np.ndarray, tspec, ts_context):
        async with self._gate(value.nbytes):
            if self.read_error is not None:
                return
            if isinstance(value, DeferredArray):
                try:
                    value = value.materialize()
                except Exception as e:  # noqa: BLE001 - re-raised by save() once every write has ended
                    self.read_error = e
                    return
            await super()._open_and_write(value, tspec, ts_context)


def _in_flight_gb(largest_bytes: int) -> float:
    return max(IN_FLIGHT_BYTES, 2 * largest_bytes + 1) / 1e9


def reader(largest_bytes: int) -> ocp.Checkpointer:
    """A checkpointer that restores jax arrays reading at most ``IN_FLIGHT_BYTES`` (or twice ``largest_bytes``, an
    array's size) at once, each placed before the next is read."""
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(restore_concurrent_gb=_in_flight_gb(largest_bytes)))


def save(path, tree, largest_bytes: int) -> None:
    """Save ``tree`` (numpy, jax and :class:`DeferredArray` leaves) as an orbax checkpoint at ``path``, writing numpy
    arrays without copying them and at most ``IN_FLIGHT_BYTES`` (or twice ``largest_bytes``) at once. If reading a
    deferred array fails, the other writes still end before its exception is raised here, so that the caller can
    remove what was written. This process writes alone: with several processes (``jax.distributed``), the others
    take no part (orbax would otherwise wait for them at its barriers)."""
    types = ocp.type_handlers
    limit = _in_flight_gb(largest_bytes)
    streaming = _StreamingNumpyHandler(int(limit * 1e9))
    registry = types.create_type_handler_registry(
        (DeferredArray, streaming),
        *[(kind, streaming if kind is np.ndarray else types.get_type_handler(kind)) for kind in types.supported_types()])
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=limit, type_handler_registry=registry,
                                          multiprocessing_options=alone)
    before = set(threading.enumerate())
    try:
        with ocp.Checkpointer(handler, multiprocessing_options=alone) as checkpointer:
            checkpointer.save(path, tree)
    except BaseException as e:  # an interrupt or a failure: the caller will remove what was written
        streaming.read_error = streaming.read_error or e  # the writes not yet started are skipped
        _join_threads_since(before)
        raise
    if streaming.read_error is not None:
        raise streaming.read_error


def _join_threads_since(before: set, timeout: float = 60.0) -> None:
    """Wait (up to ``timeout``) for the threads orbax started for a save to end, so that no write in flight lands
    after the caller has removed the folder; a second interrupt meanwhile is raised once they have ended."""
    deadline = time.monotonic() + timeout
    interrupted = None
    for thread in set(threading.enumerate()) - before:
        while thread.is_alive() and time.monotonic() < deadline:
            try:  # polled: orbax's threads raise from join(timeout) when they are still running
                time.sleep(0.05)
            except KeyboardInterrupt as e:
                interrupted = e
    if interrupted is not None:
        raise interrupted
