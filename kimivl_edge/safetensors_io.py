"""Safetensors read (memory-mapped, numpy) and streaming write, with bf16 handled as raw uint16.

numpy has no bfloat16, and the `safetensors` numpy API refuses bf16 tensors, so this module reads the format itself
(8-byte little-endian header length, JSON header, raw little-endian data) and widens bf16 to float32 exactly
(``quant.codec.bf16_to_f32``; ``quant.codec.f32_to_bf16`` narrows, round to nearest even).
Writing streams one tensor at a time: the 16B-parameter synthetic checkpoint never sits in RAM.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .quant.codec import bf16_to_f32, f32_to_bf16  # the one definition of each; re-exported for readers/writers

__all__ = ["STORAGE", "SafetensorsFile", "write_safetensors", "bf16_to_f32", "f32_to_bf16"]

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit too
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
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) != 8:
                    raise CheckpointError(f"{self.path.name}: truncated safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{self.path.name}: implausible safetensors header size {n}")
                if n > size - 8:
                    raise CheckpointError(f"{self.path.name}: header of {n} bytes runs past the end of the file "
                                          f"({size} bytes; truncated?)")
                header = json.loads(f.read(n))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nested deep
            raise CheckpointError(f"{self.path.name}: corrupt safetensors header") from None
        self._base = 8 + n
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path.name}: corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path.name}: __metadata__ is not a JSON object")
        self.metadata: dict = metadata
        self.entries: dict[str, dict] = header
        _check_entries(self.path.name, header, size - self._base)

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


def _check_entries(fname: str, entries: dict, data_bytes: int) -> None:
    """Every tensor entry as the format defines it (dtype, shape of non-negative integers, [start, end] offsets
    whose span holds exactly the shape's bytes), and the spans tile the data section exactly, as the reference
    reader requires: no overlap, no gap, nothing past the end. One-line CheckpointError otherwise."""
    spans = []
    for name, e in entries.items():
        where = f"{fname}: tensor {name[:80]!r}"
        if not isinstance(e, dict):
            raise CheckpointError(f"{where}: entry is not a JSON object")
        dtype = e.get("dtype")
        dt = STORAGE.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            raise CheckpointError(f"{where} has unsupported dtype {str(e.get('dtype'))[:40]}")
        shape, offsets = e.get("shape"), e.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise CheckpointError(f"{where}: shape is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets is not [start, end]")
        start, end = offsets
        if end < start or end - start != dt.itemsize * math.prod(shape) or end > data_bytes:
            raise CheckpointError(f"{where} has inconsistent offsets (truncated file?)")
        spans.append((start, end, name))
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            what = "overlaps the previous tensor" if start < pos else f"leaves a gap of {start - pos} bytes"
            raise CheckpointError(f"{fname}: tensor {name[:80]!r} {what}")
        pos = end
    if pos != data_bytes:
        raise CheckpointError(f"{fname}: {data_bytes - pos} bytes after the last tensor (not a safetensors file?)")


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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
