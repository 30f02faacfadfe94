"""Ctrl-C during long work (conversion, export, loading): always an interrupt, never swallowed; and a stop request
(SIGTERM from ``kill`` or a job scheduler, SIGHUP from a closed terminal) handled as Ctrl-C, so what the work was
writing is removed the same way instead of being left to the next run.

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
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
    """While active (in the main thread), SIGINT, SIGTERM and SIGHUP (those not ignored) raise
    ``KeyboardInterrupt`` in ordinary code only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # a signal the caller ignores stays ignored (nohup ignores SIGHUP, a shell's background job SIGINT)
    previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
