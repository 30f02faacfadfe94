"""Reading safetensors files with numpy, one tensor at a time (a 9.5 GB file is never held twice)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from convert.errors import ConversionError

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _read_header(path: Path) -> dict:
    """Validate the header and that the file holds every byte it promises (catches truncated downloads)."""
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
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConversionError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a mapping)")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        try:
            start, stop = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            item = _DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: tensor {key!r} has an unsupported or malformed header entry") from None
        if stop - start != count * item:
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
        self._handle = None

    def keys(self) -> list[str]:
        return sorted(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> str:
        return self.header[key]["dtype"]

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] == "BF16":  # numpy has no bfloat16; read the raw bytes as ml_dtypes.bfloat16
            start, stop = info["data_offsets"]
            with self.path.open("rb") as f:
                f.seek(self._data_start + start)
                data = f.read(stop - start)
            return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(info["shape"]).copy()
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="numpy")
            return self._handle.get_tensor(key)
        except Exception as e:  # the header was valid, so this is corruption
            raise ConversionError(f"{self.path}: cannot read tensor {key!r} ({e})") from None

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        return digest.hexdigest()
