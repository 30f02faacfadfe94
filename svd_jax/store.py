"""The converted-folder format, written and read here only; and :func:`atomic_dir`, the one way a folder is
written.

A converted folder (from the converter, :func:`svd_jax.train.checkpoints.save_models`, or :func:`write_folder`)::

    manifest.json            {"format": "svd_jax", "converter_version": FORMAT_VERSION, "source": {...},
                              "components": {name: {"layout", "config", "num_params", "dtypes",
                                                    "ignored_source_keys", "sha256"}}}
    <component>/config.json  a :mod:`svd_jax.configs` dataclass
    <component>/params/      an orbax checkpoint of ``{dotted.path: array}`` (:mod:`svd_jax.checkpoint`)

A folder (and a video or settings file, :mod:`svd_jax.video`) is written into a hidden sibling named after the
writing host and process (:func:`scratch_path`), then renamed into place, so a failed or killed write leaves no
partial destination, an existing destination is replaced only by a complete new one, and a later run can tell a
dead process's leftover from a live one's (:func:`remove_stale_scratch`, which every write into a folder and
``svd-jax clean`` call).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from svd_jax import checkpoint
from svd_jax.components import COMPONENT_CONFIGS
from svd_jax.configs import config_from_dict

FORMAT = "svd_jax"
MANIFEST = "manifest.json"
CONFIG = "config.json"
# Versions of the converted-folder format this code reads: "1" without checksums, "2" with one per component.
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")

# ---- writing a folder atomically --------------------------------------------------------------------------

# ``.NAME.partial-HOST-PID`` or ``.NAME.old-HOST-PID``, with the destination's extension after it for a file
# whose writer picks the format by it (``.clip.mp4.partial-HOST-PID.mp4``); ``.NAME.partial-PID`` is what older
# versions wrote. Only these are ever removed: a user's own hidden file (``.notes.old-2024.txt``) never matches
# unless it names this host.
_SCRATCH = re.compile(r"^\..+\.(?:(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)(?:\.[A-Za-z][A-Za-z0-9]*)?"
                      r"|partial-(?P<old_pid>\d+))$")


def scratch_path(destination: Path, role: str = "partial", keep_suffix: bool = False) -> Path:
    """The hidden sibling of ``destination`` this process writes (``role`` "partial") or moves an old destination
    to ("old"); ``keep_suffix`` ends it with the destination's extension (for ffmpeg and PIL, which choose the
    format by it)."""
    destination = Path(destination)
    suffix = destination.suffix if keep_suffix else ""
    return destination.parent / f".{destination.name}.{role}-{socket.gethostname()}-{os.getpid()}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_scratch(folder: Path) -> list[Path]:
    """Remove the hidden partial and old folders and files in ``folder`` whose writing process (on this host) is
    gone; those of live processes (and of other hosts, whose processes cannot be seen) are kept."""
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else []:
        match = _SCRATCH.match(entry.name) if entry.name.startswith(".") else None
        if (not match or (match["host"] or socket.gethostname()) != socket.gethostname()
                or _alive(int(match["pid"] or match["old_pid"]))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _move_into_place(written: Path, destination: Path) -> None:
    if not (destination.exists() or destination.is_symlink()):
        written.rename(destination)
        return
    old = scratch_path(destination, "old")
    destination.rename(old)
    try:
        written.rename(destination)
    except BaseException:
        old.rename(destination)  # the previous destination stays as it was
        raise
    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextlib.contextmanager
def atomic_dir(destination, replace: bool = True, parents: bool = False) -> Iterator[Path]:
    """``with atomic_dir(dst) as folder:`` write into ``folder``; when the block ends without an error it becomes
    ``dst`` (an existing ``dst`` is replaced only then, by the complete new folder), and on any error or interrupt
    it is removed and ``dst`` is left as it was. ``replace=False`` refuses an existing ``dst``
    (``FileExistsError``); ``parents`` creates missing parent folders. Leftovers of dead writers beside ``dst``
    are removed first."""
    destination = Path(destination)
    if not replace and (destination.exists() or destination.is_symlink()):
        raise FileExistsError(f"{destination} already exists")
    if parents:
        destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(destination.parent)
    scratch = scratch_path(destination)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
        _move_into_place(scratch, destination)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(destination, keep_suffix: bool = False) -> Iterator[Path]:
    """``with atomic_file(dst) as scratch:`` write the file ``scratch`` (:func:`scratch_path`, ``keep_suffix`` as
    there); when the block ends without an error it replaces ``dst`` in one rename, so a reader sees the old file
    or the whole new one, and on any error or interrupt it is removed and ``dst`` is left as it was."""
    destination = Path(destination)
    scratch = scratch_path(destination, keep_suffix=keep_suffix)
    try:
        yield scratch
        os.replace(scratch, destination)
    finally:
        scratch.unlink(missing_ok=True)


# ---- writing the format --------------------------------------------------------------------------------------


def new_manifest(source: dict[str, Any], version: str | None = FORMAT_VERSION) -> dict[str, Any]:
    """A manifest with no component yet; ``version`` None marks a folder not written from a checkpoint."""
    return {"format": FORMAT, "converter_version": version, "source": source, "components": {}}


def write_component(folder: Path, config, params: Mapping[str, Any], layout: str,
                    ignored_source_keys=()) -> dict[str, Any]:
    """Write one component into the new ``folder`` (its config and the checkpoint of ``params``, arrays or
    objects that save_params writes one at a time) and return its manifest entry."""
    folder = Path(folder)
    folder.mkdir()
    checkpoint.save_params(folder, params)  # looked up at call time: tests pause or fail it there
    config.save(folder / CONFIG)
    return {"layout": layout, "config": config.to_dict(),
            "num_params": int(sum(a.size for a in params.values())),
            "dtypes": dict(Counter(np.dtype(a.dtype).name for a in params.values())),
            "ignored_source_keys": list(ignored_source_keys), "sha256": component_sha256(folder)}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# ---- reading it ------------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a converted svd_jax folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path} is not a converted svd_jax folder (no {MANIFEST}); "
                         "convert a checkpoint first: python -m convert SRC DST")
    manifest = _read_json(path / MANIFEST, "manifest")
    components = manifest.get("components")
    if manifest.get("format") != FORMAT or not isinstance(components, dict) or not all(
            isinstance(info, dict) for info in components.values()):
        raise ValueError(f"{path / MANIFEST}: not an svd_jax manifest (its format and components)")
    version = manifest.get("converter_version")
    if version not in READABLE_VERSIONS and version is not None:  # None: fine-tuned from random models
        raise ValueError(f"{path / MANIFEST}: written by converter version {version!r}, this svd_jax reads "
                         f"{', '.join(READABLE_VERSIONS)} (upgrade svd_jax, or convert the source again)")
    return manifest


def component_sha256(folder: Path) -> str:
    """The checksum of a stored component: every file under ``folder`` (its config and checkpoint), by relative
    path, size and contents, so a flipped byte, a truncated, missing or added file, or an edited config changes
    it."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}:{path.stat().st_size}\n".encode())
        hash_file(path, digest)
    return digest.hexdigest()


def hash_file(path: Path, digest=None):
    """``digest`` (a new sha256 by default) updated with the file's contents, read 16 MB at a time."""
    digest = digest or hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest


def verify_component(path: Path, manifest: dict[str, Any], component: str) -> None:
    """Raise one ``ValueError`` line if the component's files differ from the checksum its manifest recorded."""
    recorded = manifest["components"][component].get("sha256")
    if recorded is None:
        if manifest.get("converter_version") in (None, "1"):
            return  # written before checksums were recorded
        raise ValueError(f"{path / MANIFEST}: records no checksum for {component}")
    if component_sha256(path / component) != recorded:
        raise ValueError(f"{path / component}: its files differ from the checksum recorded when it was written "
                         "(corrupted or edited); convert the source again (svd_jax.load(..., verify=False) skips "
                         "this check)")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a converted folder, or one ``ValueError`` line naming the file."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a readable {what} (not a JSON object)")
    return data


def read_config(folder: Path, component: str):
    """The config of ``folder/config.json``, which must be the ``component``'s kind."""
    path = Path(folder) / CONFIG
    try:
        config = config_from_dict(_read_json(path, f"{component} config"))
    except TypeError as e:  # e.g. an unhashable kind
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    if not isinstance(config, COMPONENT_CONFIGS[component]):
        raise ValueError(f"{path}: holds a {config.kind} config, not the {component}'s")
    return config
