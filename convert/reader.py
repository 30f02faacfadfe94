"""Reading safetensors files with numpy, one tensor at a time, by offset.

Each tensor is read with one positioned read into an array of its own. The file is never memory-mapped: the
resident pages of a mapping count in the process's resident size, so reading a 4.5 GiB checkpoint through one
would hold all of it resident by the end of the conversion.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.errors import ConversionError
from svd_jax.loader import hash_file

# safetensors dtype names -> numpy dtypes (little-endian, as the format stores them); numpy has no bfloat16.
DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
          "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool)}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header(path: Path) -> dict:
    """Validate the header and that the file holds every byte it promises (catches truncated downloads). Every
    entry is checked for type before use: the header is untrusted input (string offsets, negative sizes, deep
    nesting)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100_000_000):
            raise ConversionError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ConversionError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a mapping)")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
                or offsets[0] > offsets[1] or not isinstance(shape, list) or len(shape) > 16
                or not all(map(_is_count, shape)) or info.get("dtype") not in DTYPES):
            raise ConversionError(f"{path}: tensor {key!r} has an unsupported or malformed header entry")
        start, stop = offsets
        if stop - start != math.prod(shape) * DTYPES[info["dtype"]].itemsize:
            raise ConversionError(f"{path}: tensor {key!r} header size does not match its shape")
        end = max(end, stop)
    if 8 + header_len + end > size:
        raise ConversionError(f"{path}: file is truncated ({size} bytes, header promises {8 + header_len + end})")
    return header


class SafetensorsFile:
    """One safetensors file: its keys, shapes, and tensors read lazily as numpy arrays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ConversionError(f"{self.path}: no such file")
        self.header = _read_header(self.path)
        with self.path.open("rb") as f:
            self._data_start = 8 + struct.unpack("<Q", f.read(8))[0]

    def keys(self) -> list[str]:
        return sorted(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> str:
        return self.header[key]["dtype"]

    def get(self, key: str) -> np.ndarray:
        """The tensor ``key``, read from its offset into a new array."""
        info = self.header[key]
        start, stop = info["data_offsets"]
        array = np.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        with self.path.open("rb", buffering=0) as f:
            f.seek(self._data_start + start)
            done = 0
            while done < stop - start:
                n = f.readinto(buffer[done:])
                if not n:  # the file shrank after its header was checked
                    raise ConversionError(f"{self.path}: cannot read tensor {key!r} (the file ends early)")
                done += n
        return array

    def sha256(self) -> str:
        return hash_file(self.path).hexdigest()
