"""Ctrl-C during long work (conversion, export, loading): always an interrupt, never swallowed.

Python runs a signal handler between two bytecodes, which may be inside a garbage-collection callback (JAX
registers one) or a finaliser. A ``KeyboardInterrupt`` raised there is printed as "Exception ignored" and lost,
and the work goes on to finish as if nothing happened. Under :func:`sigint_interrupts`, an interrupt that arrives
inside such a callback is delivered again a moment later, outside it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading

# How long a deferred interrupt waits before it is delivered again (callbacks take microseconds).
_REDELIVER_S = 0.01


def _inside_callback(frame) -> bool:
    callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _handle(signum, frame):
    if _inside_callback(frame):
        threading.Timer(_REDELIVER_S, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_interrupts():
    """While active (in the main thread), SIGINT raises ``KeyboardInterrupt`` in ordinary code only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
