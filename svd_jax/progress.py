"""Progress bars that tell the truth about device work.

JAX dispatches work asynchronously: a loop that updates a bar after *dispatching* each step reaches 100% long
before the device has finished (and its steps/s and ETA are meaningless). :class:`StepBar` waits for each
step's result before it advances, so its position is the number of finished steps, and its rate and ETA are
the device's. Waiting costs nothing measurable: the next step depends on this one's result anyway, and a step
takes far longer than dispatching one.

The bar is tqdm's notebook widget where ipywidgets is installed and the text bar otherwise (tqdm.auto would
warn about missing widgets in a notebook without them).
"""

from __future__ import annotations

import importlib.util
import sys
import time

import jax

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm import tqdm


def progress_bar(*args, **kwargs):
    """A tqdm bar (see the module's note on notebooks); arguments as tqdm's."""
    return tqdm(*args, **kwargs)


class StepBar:
    """A bar over ``total`` steps that advances when a step's result is ready on the device.

    ``enabled=False`` shows nothing (and does not wait); ``verbose=True`` also prints each step's wall time
    (dispatch to finished result), e.g. to see the first step's compilation.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, verbose: bool = False):
        self.enabled, self.verbose = enabled, verbose
        self.bar = progress_bar(total=total, desc=desc, disable=not enabled, file=sys.stderr)
        self._last = time.perf_counter()

    @property
    def n(self) -> int:
        """Steps finished so far."""
        return self.bar.n

    def step_done(self, result) -> None:
        """Wait for ``result`` (any pytree of arrays) to be computed, then advance by one step."""
        if not self.enabled:
            return
        jax.block_until_ready(result)
        now = time.perf_counter()
        if self.verbose:
            self.bar.write(f"step {self.bar.n + 1}/{self.bar.total}: {now - self._last:.3f} s", file=sys.stderr)
        self._last = now
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "StepBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
