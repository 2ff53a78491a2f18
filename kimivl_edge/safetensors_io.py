"""Safetensors read (memory-mapped, numpy) and streaming write, with bf16 handled as raw uint16.

numpy has no bfloat16, and the `safetensors` numpy API refuses bf16 tensors, so this module reads the format itself
(8-byte little-endian header length, JSON header, raw little-endian data) and widens bf16 to float32 exactly
(``quant.codec.bf16_to_f32``; ``quant.codec.f32_to_bf16`` narrows, round to nearest even).
Writing streams one tensor at a time: the 16B-parameter synthetic checkpoint never sits in RAM.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .quant.codec import bf16_to_f32, f32_to_bf16  # the one definition of each; re-exported for readers/writers

__all__ = ["STORAGE", "SafetensorsFile", "write_safetensors", "bf16_to_f32", "f32_to_bf16"]

# safetensors dtype name -> (numpy storage dtype, bytes per element)
STORAGE: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}


class SafetensorsFile:
    """One .safetensors file, memory-mapped. ``raw(name)`` is a zero-copy view in the stored dtype."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise CheckpointError(f"{self.path.name}: truncated safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > 100_000_000:
                    raise CheckpointError(f"{self.path.name}: implausible safetensors header size {n}")
                header = json.loads(f.read(n))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else None
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path.name}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict] = header
        self._base = 8 + n
        size = self.path.stat().st_size
        for name, ent in header.items():
            dt = STORAGE.get(ent.get("dtype"))
            if dt is None:
                raise CheckpointError(f"{self.path.name}: tensor {name} has unsupported dtype {ent.get('dtype')}")
            start, end = ent["data_offsets"]
            if end - start != dt.itemsize * int(np.prod(ent["shape"], dtype=np.int64)) or self._base + end > size:
                raise CheckpointError(f"{self.path.name}: tensor {name} has inconsistent offsets (truncated file?)")

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def offset(self, name: str) -> int:
        """Where the tensor's data starts in the file (bytes from the start)."""
        return self._base + self.entries[name]["data_offsets"][0]

    def raw(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = e["data_offsets"]
        if self._mm is None:  # an empty file has no tensors to read
            raise CheckpointError(f"{self.path.name}: empty file")
        arr = np.frombuffer(self._mm, dtype=STORAGE[e["dtype"]], count=(end - start) // STORAGE[e["dtype"]].itemsize,
                            offset=self.offset(name))
        return arr.reshape(e["shape"])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor seen as [rows, last axis], read with pread into a new array in the
        stored dtype. Unlike ``raw`` this leaves no file pages mapped in the process, so streaming a 30 GB
        checkpoint does not grow the resident set (the kernel's page cache still serves repeated reads)."""
        e = self.entries[name]
        dt = STORAGE[e["dtype"]]
        shape = e["shape"]
        ne0 = int(shape[-1]) if shape else 1
        out = np.empty((stop - start, ne0), dt)
        view = out.reshape(-1).view(np.uint8).data
        pos = self.offset(name) + start * ne0 * dt.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], pos + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path.name}: unexpected end of file reading {name}")
                done += n
        finally:
            os.close(fd)
        return out

    def float32(self, name: str) -> np.ndarray:
        """The tensor widened to float32 (a new array)."""
        raw = self.raw(name)
        if self.dtype(name) == "BF16":
            return bf16_to_f32(raw)
        return raw.astype(np.float32)


def write_safetensors(path: str | Path, specs: Iterable[tuple[str, tuple[int, ...], str]],
                      produce: Callable[[str, tuple[int, ...], str], Iterable[np.ndarray]],
                      metadata: dict | None = None) -> int:
    """Write a safetensors file tensor by tensor.

    ``specs`` lists (name, shape, dtype); the header is written first from the shapes, then ``produce(name, shape,
    dtype)`` yields the tensor's data as one or more arrays in storage dtype (chunks of the flattened tensor, in
    order), so a tensor of any size can be generated in pieces. Returns the number of bytes written.
    """
    specs = list(specs)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = STORAGE[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align data to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            got = 0
            for chunk in produce(name, shape, dtype):
                chunk = np.ascontiguousarray(chunk, dtype=STORAGE[dtype])
                f.write(chunk.reshape(-1).view(np.uint8).data)
                got += chunk.nbytes
            if got != want:
                raise ValueError(f"{name}: produced {got} bytes, expected {want}")
    return 8 + len(blob) + offset
