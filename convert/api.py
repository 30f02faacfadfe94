"""``convert(src, dst)``: PyTorch safetensors -> one orbax checkpoint per component, a config and a manifest.

The output is written to a hidden sibling folder and renamed into place at the end, so a failed or interrupted
run leaves nothing at ``dst``; an existing ``dst`` is kept unless ``force``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from convert import layouts, rules
from convert.errors import ConversionError
from svd_jax.components import abstract_model
from svd_jax.errors import os_error_line
from svd_jax.store import FORMAT_VERSION as CONVERTER_VERSION  # noqa: F401 (convert.CONVERTER_VERSION)
from svd_jax.store import atomic_dir, new_manifest, scratch_path, write_component, write_manifest

# Source dtypes a weight may have; integer or boolean weights are refused rather than cast (a model whose weights
# were stored as integers is not the model it claims to be).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _prepare(sources: list[layouts.ComponentSource]) -> list[tuple[layouts.ComponentSource, dict]]:
    """Check every component's keys, shapes and dtypes before any tensor is read or anything is written."""
    seen = Counter(s.component for s in sources)
    if doubled := [c for c, n in seen.items() if n > 1]:
        raise ConversionError(f"the source holds more than one {', '.join(doubled)}")
    planned = []
    for source in sources:
        expected = rules.expected_keys(abstract_model(source.component, source.config))
        shapes = {key: ref.shape for key, ref in source.tensors.items()}
        source.ignored = sorted(set(source.ignored) | set(rules.plan(source.component, expected, shapes)))
        for key in expected:
            ref = source.tensors[key]
            if ref.file.dtype(ref.key) not in FLOAT_DTYPES:
                raise ConversionError(f"{ref.file.path}: tensor {ref.key!r} has dtype {ref.file.dtype(ref.key)}; "
                                      f"weights must be floating point ({', '.join(FLOAT_DTYPES)})")
        planned.append((source, expected))
    return planned


def _write_component(folder: Path, source: layouts.ComponentSource, expected: dict) -> dict:
    """Each tensor is read, transformed and written in turn: the component is never in memory as a whole."""
    params = rules.deferred(expected, lambda key: source.tensors[key].dtype, lambda key: _finite(source.tensors[key]))
    return write_component(folder, source.config, params, source.layout, source.ignored)


def _finite(ref: layouts.TensorRef) -> np.ndarray:
    """The tensor, refused if it holds NaN or infinity (a model with them generates black video)."""
    array = ref.read()
    finite = np.isfinite(array)
    if not finite.all():
        raise ConversionError(f"{ref.file.path}: tensor {ref.key!r} holds {finite.size - int(finite.sum())} "
                              f"non-finite values (NaN or infinity) of {finite.size}")
    return array


def check_separate(src: Path, dst: Path) -> None:
    """Refuse a destination that is, is inside, or contains the source: replacing it would delete the source."""
    source, destination = Path(src).resolve(), Path(dst).resolve()
    if source == destination:
        relation = "is"
    elif source in destination.parents:
        relation = "is inside"
    elif destination in source.parents:
        relation = "contains"
    else:
        return
    raise ConversionError(f"{dst} {relation} the source {src}: choose a destination outside it")


def written_error(error: OSError, tmp: Path, dst: Path) -> ConversionError:
    """An I/O failure while writing ``tmp`` as one line naming the file under its final name ``dst``."""
    return ConversionError(os_error_line(error).replace(str(tmp), str(dst)))


def _relative(path: Path, src: Path) -> str:
    """A source file's path within the source folder (its name when the source is the file itself)."""
    try:
        return path.relative_to(src).as_posix() if src.is_dir() else path.name
    except ValueError:
        return path.name


def _with_unet(sources: list[layouts.ComponentSource], unet: Path, config_dir) -> list[layouts.ComponentSource]:
    """``sources`` with their UNet replaced by the one UNet ``unet`` holds."""
    replacement = layouts.detect(unet, config_dir)
    if [s.component for s in replacement] != ["unet"]:
        raise ConversionError(f"--unet {unet}: holds {', '.join(s.component for s in replacement)}, not one UNet")
    return [s for s in sources if s.component != "unet"] + replacement


def convert(src, dst, config_dir=None, force: bool = False, hash_sources: bool = True, unet=None) -> dict:
    """Convert ``src`` (see :mod:`convert.layouts`) into the folder ``dst``; returns the manifest.

    ``unet``: a UNet source (any accepted layout, e.g. a fine-tune's single diffusers-named file such as
    AnimateLCM-SVD-xt's) converted in place of ``src``'s UNet, ``src`` giving the other components."""
    src, dst = Path(src), Path(dst)
    check_separate(src, dst)
    if unet is not None:
        check_separate(Path(unet), dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists (pass --force to replace it)")
    if not dst.parent.is_dir():
        raise ConversionError(f"{dst.parent}: the destination's parent folder does not exist")
    config_dir = Path(config_dir) if config_dir else None
    sources = layouts.detect(src, config_dir)
    if unet is not None:
        sources = _with_unet(sources, Path(unet), config_dir)
    planned = _prepare(sources)
    files = {f.path: f for source, _ in planned for f in source.files}
    used_by = {path: [source.component for source, _ in planned if any(f.path == path for f in source.files)]
               for path in files}
    manifest = new_manifest({
            "path": str(src),
            **({"unet_path": str(unet)} if unet is not None else {}),
            "files": [{"name": path.name, "path": _relative(path, src), "components": used_by[path],
                       "bytes": path.stat().st_size, "sha256": f.sha256() if hash_sources else None}
                      for path, f in files.items()],
    })
    try:
        with atomic_dir(dst, replace=force) as tmp:
            for source, expected in planned:
                manifest["components"][source.component] = _write_component(tmp / source.component, source, expected)
            write_manifest(tmp, manifest)
    except OSError as e:
        raise written_error(e, scratch_path(dst), dst) from None
    return manifest
