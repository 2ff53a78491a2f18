"""ctypes access to ggml's own C quantizer in llama-cpp-python's ``libggml-base``.

The converter's encoder (``quant.kernels``) and the tests' oracle. Exposes ``ggml_quantize_chunk`` (ggml.c) and
the per-type ``to_float`` from ``ggml_get_type_traits`` (ggml.h ``struct ggml_type_traits``), plus the size helpers,
so numpy results can be compared with the exact bytes/floats llama.cpp itself produces.
"""
from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from .types import QTypeLike, as_ggml, row_nbytes

__all__ = [
    "library_path",
    "available",
    "ggml_quantize_chunk",
    "quantize",
    "to_float",
    "ggml_blck_size",
    "ggml_type_size",
    "ggml_row_size",
]

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """Mirror of ``struct ggml_type_traits`` (ggml/include/ggml.h, llama.cpp vendored in llama-cpp-python 0.3.36)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def find_llama_cpp_library(stem: str) -> Path:
    """Path of the shared library ``lib<stem>`` inside the installed ``llama_cpp`` package (without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llama_cpp (llama-cpp-python) is not installed")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise FileNotFoundError(f"no lib{stem} shared library under {lib_dir}")


def library_path() -> Path:
    """Path of ``libggml-base`` inside the installed ``llama_cpp`` package."""
    return find_llama_cpp_library("ggml-base")


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def available() -> bool:
    """True if the ggml shared library can be loaded."""
    try:
        _lib()
    except (OSError, FileNotFoundError, AttributeError):
        return False
    return True


def ggml_blck_size(qtype: QTypeLike) -> int:
    """ggml's block size for a type."""
    return int(_lib().ggml_blck_size(as_ggml(qtype).value))


def ggml_type_size(qtype: QTypeLike) -> int:
    """ggml's bytes per block for a type."""
    return int(_lib().ggml_type_size(as_ggml(qtype).value))


def ggml_row_size(qtype: QTypeLike, ne0: int) -> int:
    """ggml's bytes per row of ``ne0`` elements."""
    return int(_lib().ggml_row_size(as_ggml(qtype).value, ne0))


def ggml_quantize_chunk(qtype: QTypeLike, src: np.ndarray, dst: np.ndarray, start: int, nrows: int,
                        n_per_row: int, imatrix: np.ndarray | None = None) -> int:
    """Direct call of C ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)``.

    ``src`` float32 C-contiguous, ``dst`` a writable C-contiguous byte buffer large enough for the rows;
    ``start`` is an element offset (multiple of n_per_row). Returns bytes written. ggml aborts the process on a
    failed assertion, so the preconditions are checked here first.
    """
    t = as_ggml(qtype)
    lib = _lib()
    if src.dtype != np.float32 or not src.flags.c_contiguous:
        raise ValueError("src must be C-contiguous float32")
    if not dst.flags.c_contiguous or not dst.flags.writeable:
        raise ValueError("dst must be a writable C-contiguous buffer")
    if start % n_per_row != 0 or start + nrows * n_per_row > src.size:
        raise ValueError("start/nrows outside src")
    row_bytes = row_nbytes(t, n_per_row)
    if dst.nbytes < (start // n_per_row + nrows) * row_bytes:
        raise ValueError("dst too small")
    if imatrix is None and lib.ggml_quantize_requires_imatrix(t.value):
        raise ValueError(f"{t.name} requires an importance matrix")
    im = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.size != n_per_row:
            raise ValueError("imatrix must have n_per_row elements")
        im = imatrix.ctypes.data
    return int(lib.ggml_quantize_chunk(t.value, src.ctypes.data, dst.ctypes.data, start, nrows, n_per_row, im))


def quantize(a: np.ndarray, qtype: QTypeLike, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float array (numpy shape, last axis = row) with ggml; uint8 ``(*shape[:-1], row_bytes)``."""
    t = as_ggml(qtype)
    a = np.ascontiguousarray(a, dtype=np.float32)
    n_per_row = a.shape[-1]
    nrows = a.size // n_per_row
    out = np.zeros((nrows, row_nbytes(t, n_per_row)), dtype=np.uint8)
    written = ggml_quantize_chunk(t, a.reshape(-1), out, 0, nrows, n_per_row, imatrix)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out.reshape(*a.shape[:-1], out.shape[-1])


def to_float(raw: np.ndarray, qtype: QTypeLike, n: int) -> np.ndarray:
    """Decode ``n`` elements of ``qtype`` data with ggml's ``type_traits->to_float``."""
    t = as_ggml(qtype)
    traits = _lib().ggml_get_type_traits(t.value).contents
    if not traits.to_float:
        raise NotImplementedError(f"ggml has no to_float for {t.name}")
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size * traits.blck_size < n * traits.type_size:
        raise ValueError("raw buffer too small")
    out = np.empty(n, dtype=np.float32)
    fn = _to_float_t(traits.to_float)
    fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
    return out
