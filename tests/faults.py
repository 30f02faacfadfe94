"""Helpers for fault tests: a child Python process that announces a point of its run and waits there, so a test
can interrupt, kill or race it exactly at that point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from parity import REPO

# Prepended to a child's script: ``pause_at(module, name, tag)`` wraps ``module.name`` so that its first call
# prints ``tag`` and then sleeps until the parent signals the child or creates the file $GATE.
PAUSE = '''
import os, sys, time
from pathlib import Path

def pause_at(module, name, tag, once=True):
    real = getattr(module, name)
    calls = []

    def paused(*args, **kwargs):
        if not (once and calls):
            calls.append(1)
            print(tag, flush=True)
            while not Path(os.environ.get("GATE", "/nonexistent")).exists():
                time.sleep(0.02)
        return real(*args, **kwargs)

    setattr(module, name, paused)
'''


def start(script: str, *args, env: dict | None = None) -> subprocess.Popen:
    """Run ``PAUSE + script`` in a child Python with ``args`` as ``sys.argv[1:]``, in the repository root."""
    return subprocess.Popen([sys.executable, "-c", PAUSE + script, *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def wait_for_line(child: subprocess.Popen, tag: str, timeout: float = 120) -> None:
    """Read the child's stdout until the line ``tag`` (its announced point); fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if line.strip() == tag:
            return
        if not line and child.poll() is not None:
            raise AssertionError(f"child exited {child.returncode} before {tag}: {child.stderr.read()}")
    raise AssertionError(f"child did not reach {tag} in {timeout} s")


def finish(child: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """The child's exit code and stderr once it ends."""
    _, err = child.communicate(timeout=timeout)
    return child.returncode, err


def leftovers(folder: Path, allowed: set[str] = frozenset()) -> list[str]:
    """Everything under ``folder`` (relative paths) but the ``allowed`` top-level names."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).iterdir() if p.name not in allowed)
