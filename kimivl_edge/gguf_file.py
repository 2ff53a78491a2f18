"""The one GGUF reader of the runtime: the key/value header, the tensor index and memory-mapped tensor data.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, key/value count u64, the
key/value pairs, then per tensor: name (u64 length + UTF-8), n_dims u32, ``ne`` (n_dims × u64, fastest axis first),
ggml type u32, offset u64 relative to the data section. The data section starts at the first multiple of
``general.alignment`` (default 32) after the index.

Why not gguf-py's ``GGUFReader``: it builds numpy views for every element of every string array, 15-25 s for a
real-size vocabulary (163 840 tokens + ~163 000 merges); this parser reads such a header in well under a second.

Everything a hostile file could lie about is checked before it is used: lengths and counts against the bytes left,
tensor types against ggml's table, shapes against the block size, every tensor's bytes against the file's end and
its neighbours. Anything wrong raises ``GGUFFileError`` with a one-line message; nothing is allocated beyond the
file's own size.
"""
from __future__ import annotations

import itertools
import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from .errors import GGUFFileError, one_line

__all__ = ["GGUFFile", "TensorInfo", "read_metadata"]

# GGUF scalar types -> little-endian struct format (arrays hold these or strings).
_SCALAR_FORMAT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_NUMPY_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index. ``ne`` is ggml's order (fastest axis first); ``shape`` is numpy's."""

    name: str
    ne: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int   # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)


class _Cursor:
    """Sequential little-endian reads from a buffer; raises ValueError past the end."""

    def __init__(self, buf: Any):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise ValueError("header runs past the end of the file")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        end = self.pos + n
        if end > self.size:
            raise ValueError("string runs past the end of the file")
        s = bytes(self.buf[self.pos:end]).decode("utf-8")
        self.pos = end
        return s

    def strings(self, count: int) -> list[str]:
        """``count`` consecutive strings (the hot loop of a 163 840-token vocabulary, kept tight)."""
        buf, pos, size = self.buf, self.pos, self.size
        if count > (size - pos) // 8:  # every string takes at least its 8-byte length
            raise ValueError("array longer than the file")
        unpack, out = struct.Struct("<Q").unpack_from, []
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise ValueError("string runs past the end of the file")
            out.append(buf[pos:pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int) -> tuple[Any, GGUFValueType | None]:
        """(value, array element type or None)."""
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype == GGUFValueType.ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == GGUFValueType.STRING:
                return self.strings(count), GGUFValueType.STRING
            if etype not in _SCALAR_FORMAT:
                raise ValueError(f"unsupported array element type {etype}")
            dtype = np.dtype(_SCALAR_FORMAT[GGUFValueType(etype)])
            if count > (self.size - self.pos) // dtype.itemsize:
                raise ValueError("array runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return arr, GGUFValueType(etype)
        if vtype not in _SCALAR_FORMAT:
            raise ValueError(f"unsupported value type {vtype}")
        return self.scalar(_SCALAR_FORMAT[GGUFValueType(vtype)]), None


def _tensor_nbytes(name: str, ne: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if ne[0] % block:
        raise ValueError(f"tensor {name}: row of {ne[0]} is not a multiple of {qtype.name}'s block of {block}")
    return ne[0] // block * size * math.prod(ne[1:])


class GGUFFile:
    """A GGUF file, memory-mapped read-only: ``metadata`` (key -> value), ``tensors`` (name -> TensorInfo, in file
    order), ``data(name)`` (a view of the mapped bytes). ``tensors=False`` reads the key/value header only."""

    def __init__(self, path: str | os.PathLike, tensors: bool = True):
        self.path = Path(path)
        self.version = 0
        self.metadata: dict[str, Any] = {}
        # key -> (GGUF value type, element type of an array): llama.cpp reads a key only in its exact type
        self.types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.data_start: int | None = None  # None when the tensor index was not read
        self._map: mmap.mmap | None = None
        try:
            st = os.stat(self.path)
            if stat.S_ISDIR(st.st_mode):
                raise GGUFFileError(f"{self.path}: is a directory, not a GGUF file")
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a device: open() could block, reads never end
                raise GGUFFileError(f"{self.path}: not a regular file")
            if st.st_size == 0:
                raise GGUFFileError(f"{self.path}: not a GGUF file (empty)")
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise GGUFFileError(f"{self.path}: no such file") from None
        except (OSError, ValueError) as e:  # ValueError: mmap of a file emptied since the stat
            raise GGUFFileError(f"{self.path}: cannot read ({one_line(e)})") from None
        self.size = len(self._map)
        try:
            self._parse(tensors)
        except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
            self.close()
            raise GGUFFileError(f"{self.path}: not a GGUF file ({e.__class__.__name__}: {one_line(e)})") from None

    def _parse(self, with_tensors: bool) -> None:
        assert self._map is not None
        cur = _Cursor(self._map)
        if cur.scalar("<I") != GGUF_MAGIC:
            raise ValueError("bad magic")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_kv > self.size // 12 or n_tensors > self.size // 24:  # smallest possible entries
            raise ValueError(f"{n_kv} keys / {n_tensors} tensors cannot fit in {self.size} bytes")
        meta = self.metadata
        for _ in range(n_kv):
            key = cur.string()
            if key in meta:  # llama.cpp and gguf-py refuse it too: which value would count?
                raise ValueError(f"key {key} listed twice")
            vtype = cur.scalar("<I")
            meta[key], etype = cur.value(vtype)
            self.types[key] = (GGUFValueType(vtype), etype)
        if not with_tensors:
            return
        align = meta.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise ValueError(f"{Keys.General.ALIGNMENT} {align!r} is not a power of two")
        entries: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]] = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name}: {n_dims} dimensions")
            ne = tuple(cur.scalar("<Q") for _ in range(n_dims))
            if any(d <= 0 or d >= 1 << 62 for d in ne):
                raise ValueError(f"tensor {name}: dimensions {list(ne)}")
            raw_type, rel = cur.scalar("<I"), cur.scalar("<Q")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"tensor {name}: unknown ggml type {raw_type}") from None
            if qtype not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor {name}: ggml type {qtype.name} has no size")
            if name in names:
                raise ValueError(f"tensor {name} listed twice")
            names.add(name)
            entries.append((name, ne, qtype, rel))
        data_start = -(-cur.pos // align) * align
        spans: list[tuple[int, int, str]] = []
        for name, ne, qtype, rel in entries:
            nbytes = _tensor_nbytes(name, ne, qtype)
            if rel % align:
                raise ValueError(f"tensor {name}: offset {rel} is not aligned to {align}")
            off = data_start + rel
            if off + nbytes > self.size:
                raise ValueError(f"tensor {name}: {nbytes} bytes at {off} run past the end of the file "
                                 f"({self.size} bytes)")
            self.tensors[name] = TensorInfo(name, ne, qtype, off, nbytes)
            spans.append((off, off + nbytes, name))
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                raise ValueError(f"tensors {a} and {b} overlap")
        self.data_start = data_start

    # -- access ---------------------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def info(self, name: str) -> TensorInfo:
        t = self.tensors.get(name)
        if t is None:
            raise GGUFFileError(f"{self.path}: missing tensor {name}")
        return t

    def data(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only view of the map: float and integer types as their numpy dtype in numpy
        ``shape``, BF16 as uint16 in ``shape``, block-quantized types as uint8 ``[..., row_bytes]`` (as gguf-py's
        reader gives them; it gives BF16 as uint8 rows too)."""
        t = self.info(name)
        if self._map is None:
            raise GGUFFileError(f"{self.path}: file is closed")
        dtype = np.uint16 if t.type == GGMLQuantizationType.BF16 else _NUMPY_DTYPES.get(t.type)
        if dtype is not None:
            return np.frombuffer(self._map, dtype, t.n_elements, t.offset).reshape(t.shape)
        rows = t.shape[:-1]
        return np.frombuffer(self._map, np.uint8, t.nbytes, t.offset).reshape(*rows, t.nbytes // math.prod(rows))

    def close(self) -> None:
        m = self._map
        if m is not None:
            try:
                m.close()
            except BufferError:  # views still exported: the map is freed when the last view goes
                pass
            self._map = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Key -> value of a GGUF file's header (strings as str, string arrays as lists of str, numeric arrays as numpy
    arrays); the tensor index is not read. Raises GGUFFileError (one line) on anything that is not such a file."""
    f = GGUFFile(path, tensors=False)
    try:
        return f.metadata
    finally:
        f.close()
