"""A small pure-numpy reader and writer of the safetensors format (no new dependency).

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian uint64 header length n, then n
bytes of UTF-8 JSON {name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}, then the byte buffer; offsets are relative to the buffer's start, tensors are C-contiguous and
little-endian. bfloat16 and float8 come from `ml_dtypes` (a dependency of jax).

Reading memory-maps the file, so a tensor is only read from disk when it is used.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile(Mapping):
    """Read-only mapping name -> np.ndarray (memory-mapped) over one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: header length {n} is invalid for a file of {size} bytes")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{self.path}: header is not valid JSON ({err})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._buffer_size = size - self._start
        self._entries = {}
        for name, entry in header.items():
            if entry.get("dtype") not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            dtype, shape = _DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            if end - begin != dtype.itemsize * int(np.prod(shape)) or not 0 <= begin <= end <= self._buffer_size:
                raise ValueError(f"{self.path}: tensor {name!r} has inconsistent data_offsets {[begin, end]} "
                                 f"for dtype {entry['dtype']} and shape {list(shape)}")
            self._entries[name] = (dtype, shape, begin)
        self._mmap = None

    def _buffer(self) -> np.ndarray:
        if self._mmap is None:
            if self._buffer_size == 0:
                self._mmap = np.zeros((0,), np.uint8)
            else:
                self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._start,
                                       shape=(self._buffer_size,))
        return self._mmap

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape))
        return np.frombuffer(self._buffer(), dtype=dtype, count=count, offset=begin).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one file as numpy arrays (memory-mapped views)."""
    f = SafetensorsFile(path)
    return {name: f[name] for name in f}


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write name -> array (numpy or jax) as one safetensors file, tensors in name order."""
    header, arrays, offset = {}, [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name]))
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
