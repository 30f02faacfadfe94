"""How failures are reported: one line that names the file (or the stage) and the problem.

The command line prints these lines as ``error: ...`` and exits 2; the library raises them as ordinary
``OSError``/``ValueError`` so callers can catch them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from pathlib import Path

# Orbax's storage layer (tensorstore) reports a failure as a status text ("OUT_OF_RANGE: Error writing ..."),
# with the operating system's error code inside when there is one.
STORAGE_STATUS = re.compile(r"^[A-Z_]+: ")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def os_error_line(error: OSError, path: str | os.PathLike | None = None) -> str:
    """``FILE: reason`` for an ``OSError``: its own file when it names one, else ``path``."""
    name = error.filename if error.filename is not None else path
    text = str(error).strip()
    reason = error.strerror or (text.splitlines()[0] if text else type(error).__name__)
    if name is None or str(name) in reason:
        return reason
    return f"{name}: {reason}"


def storage_status(error: BaseException) -> BaseException | None:
    """The storage layer's status error behind ``error`` (itself, or the one it was raised from: orbax wraps a read
    error as "Encountered error while reading array index ..."), or None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if STORAGE_STATUS.match(str(error)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def storage_error(error: Exception, path: str | os.PathLike, action: str) -> OSError:
    """An orbax/tensorstore failure while ``action`` (``"write"``, ``"read"``) the checkpoint at ``path``, as one
    ``OSError`` line: the operating system's reason when the status text carries one (disk full, file too large,
    read-only), else the status text's first line."""
    text = str(error).strip()
    code = _OS_ERROR_CODE.search(text)
    if code:
        return OSError(int(code.group(1)), f"cannot {action} the checkpoint ({os.strerror(int(code.group(1)))})",
                       str(Path(path)))
    first = text.splitlines()[0] if text else type(error).__name__
    return OSError(f"{path}: cannot {action} the checkpoint ({first[:300]})")


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@contextlib.contextmanager
def one_line_failures():
    """For a command line that reports a failed checkpoint write or read as one line: while active, orbax's own
    error logs of that failure (a traceback per background thread) and the "Event loop is closed" reports of its
    abandoned writes are dropped. Everything else is reported as usual."""
    absl = logging.getLogger("absl")
    drop = _DropOrbaxErrors()
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            previous_hook(unraisable)

    absl.addFilter(drop)
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        absl.removeFilter(drop)


class NonFiniteError(FloatingPointError):
    """A generation produced NaN or infinity: its output would be black frames, so it is refused instead."""


class OutOfMemory(MemoryError):
    """A device ran out of memory in a named stage; the message says what to lower."""


def _is_out_of_memory(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error) or isinstance(error, MemoryError)


@contextlib.contextmanager
def stage(name: str, lower: str):
    """Turn a device's out-of-memory failure inside the block into one :class:`OutOfMemory` line naming the stage
    (``"sampling"``) and what to lower (``"num_frames, height and width, or the batch"``)."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        raise OutOfMemory(f"out of memory while {name}: lower {lower}") from e


@functools.cache
def _all_finite_program():
    """``isfinite(array).all()`` as one jitted program (eagerly it is two, compiled per shape in every new
    process); built on first use, as this module is imported before JAX."""
    import jax
    import jax.numpy as jnp

    def all_finite(array):
        return jnp.isfinite(array).all()

    return jax.jit(all_finite)


def check_finite(array, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``array`` holds NaN or infinity (one device-to-host transfer of a flag)."""
    if not bool(_all_finite_program()(array)):
        raise NonFiniteError(f"{what} hold NaN or infinity: the weights or the inputs are broken")
