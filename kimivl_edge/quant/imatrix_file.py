"""Importance matrices in llama.cpp's own GGUF imatrix format (tools/imatrix/imatrix.cpp ``save_imatrix``,
common/imatrix-loader.cpp ``common_imatrix_load``, llama.cpp vendored in llama-cpp-python 0.3.36).

One entry per weight tensor ``W`` (its GGUF name): ``W.in_sum2``, F32 ggml ne ``[ne0, n_mat]``, the sum over the
tokens that reached matrix m of the squared input activations, and ``W.counts``, F32 ne ``[1, n_mat]``, how many
tokens reached it. ``n_mat`` is 1 for a 2-D weight, the expert count for a stacked expert tensor (only the tokens
routed to an expert count for it) and the head count for MLA's 3-D ``attn_k_b`` / ``attn_v_b``. Keys:
``general.type`` = "imatrix", ``imatrix.datasets`` (strings), ``imatrix.chunk_count``, ``imatrix.chunk_size`` (u32);
``llama-quantize`` refuses a GGUF imatrix without the last three.

``quantize_weights`` turns an entry into the per-row weights ggml's quantizers take, exactly as llama-quantize's
``load_imatrix`` does: ``in_sum2 / count`` per matrix in float32, all ones for a matrix no token reached.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import GGUFFileError, KimiVLError
from ..gguf_file import GGUFFile

SUM2, COUNTS = ".in_sum2", ".counts"
KEY_TYPE, KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = (
    "general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


class ImatrixError(KimiVLError):
    """An importance-matrix file that cannot be used (not one, damaged, or made for another model)."""


@dataclass(frozen=True)
class Entry:
    """One weight tensor's statistics: ``sums`` float [n_mat, ne0], ``counts`` int [n_mat]."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def quantize_weights(self) -> np.ndarray:
        """float32 [n_mat, ne0]: llama-quantize's per-row importance weights (sums / count; 1 where count is 0)."""
        sums = self.sums.astype(np.float32)
        count = self.counts.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            w = sums / count
        return np.where(count > 0, w, np.float32(1)).astype(np.float32)


@dataclass(frozen=True)
class Imatrix:
    """A whole file: weight name -> Entry, and the keys (datasets, chunk count and size; ours count chats and
    their mean length in tokens)."""

    entries: Mapping[str, Entry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0


def write_imatrix(path: str | os.PathLike, im: Imatrix) -> None:
    """Write ``im`` as llama-imatrix does: keys, then per entry (sorted by name) ``.in_sum2`` and ``.counts``."""
    w = gguf.GGUFWriter(path, "imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
    w.add_string(KEY_TYPE, "imatrix")
    w.add_array(KEY_DATASETS, list(im.datasets))
    w.add_uint32(KEY_CHUNK_COUNT, im.chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, im.chunk_size)
    for name in sorted(im.entries):
        e = im.entries[name]
        w.add_tensor(name + SUM2, np.ascontiguousarray(e.sums, dtype=np.float32))
        w.add_tensor(name + COUNTS, np.asarray(e.counts, dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """A GGUF imatrix file; anything else (a missing file, a model GGUF, a damaged entry) is a one-line
    ImatrixError. llama.cpp's legacy ``.dat`` format is not read."""
    try:
        f = GGUFFile(path)
    except GGUFFileError as e:
        raise ImatrixError(f"--imatrix {e}") from None
    with f:
        meta = f.metadata
        if meta.get(KEY_TYPE) != "imatrix" or not any(n.endswith(SUM2) for n in f.tensors):
            raise ImatrixError(f"--imatrix {path}: not an importance matrix (a GGUF without general.type "
                               f"\"imatrix\" and {SUM2} tensors; make one with kimivl-edge imatrix)")
        for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
            if key not in meta:  # llama-quantize refuses such a file too
                raise ImatrixError(f"--imatrix {path}: missing the {key} key")
        entries = {}
        for tname in f.tensors:
            if tname.endswith(SUM2):
                name = tname[: -len(SUM2)]
                entries[name] = _entry(f, name, path)
            elif not tname.endswith(COUNTS) or tname[: -len(COUNTS)] + SUM2 not in f.tensors:
                raise ImatrixError(f"--imatrix {path}: unexpected tensor {tname}")
        datasets = meta[KEY_DATASETS]
        return Imatrix(entries, tuple(datasets) if isinstance(datasets, list) else (),
                       int(meta[KEY_CHUNK_COUNT]), int(meta[KEY_CHUNK_SIZE]))


def _entry(f: GGUFFile, name: str, path: str | os.PathLike) -> Entry:
    s, c = f.tensors[name + SUM2], f.tensors.get(name + COUNTS)
    if c is None:
        raise ImatrixError(f"--imatrix {path}: {name} has sums but no counts")
    if s.type != gguf.GGMLQuantizationType.F32 or c.type != gguf.GGMLQuantizationType.F32:
        raise ImatrixError(f"--imatrix {path}: {name}: sums and counts must be F32")
    n_mat = c.n_elements
    if s.n_elements % n_mat:
        raise ImatrixError(f"--imatrix {path}: {name}: {s.n_elements} sums for {n_mat} matrices")
    sums = np.array(f.data(name + SUM2), dtype=np.float32).reshape(n_mat, -1)
    counts = np.rint(np.array(f.data(name + COUNTS), dtype=np.float64).reshape(-1))  # std::lround
    if not (np.isfinite(sums).all() and np.isfinite(counts).all()) or (counts < 0).any() or (sums < 0).any():
        raise ImatrixError(f"--imatrix {path}: {name}: negative or non-finite values")
    return Entry(sums, counts.astype(np.int64))


def check_for_model(im: Imatrix, path: str | os.PathLike, tensors: Mapping[str, Sequence[int]]) -> None:
    """``im`` belongs to the model whose weights are ``tensors`` (GGUF name -> numpy shape): every entry names one
    of them and has ``ne0 * n_mat`` values (n_mat = the leading axis of a 3-D weight, else 1), the size check of
    llama_model_quantize. One-line ImatrixError otherwise."""
    for name, e in sorted(im.entries.items()):
        shape = tensors.get(name)
        if shape is None:
            raise ImatrixError(f"--imatrix {path} is for another model: it has an entry for {name}, which this "
                               "model does not have")
        want = shape[-1] * (shape[0] if len(shape) == 3 else 1)
        if e.sums.size != want:
            raise ImatrixError(f"--imatrix {path} is for another model: {name} has {e.sums.size} values, this "
                               f"model's {list(shape)} weight needs {want}")


def weights_for(im: Imatrix | None, name: str, shape: Sequence[int]) -> np.ndarray | None:
    """Per-matrix importance weights float32 [n_mat, ne0] for the weight ``name`` of numpy ``shape`` (rows of
    matrix m use row m), or None when ``im`` has no entry for it (llama.cpp then quantizes without)."""
    if im is None or name not in im.entries:
        return None
    w = im.entries[name].quantize_weights
    n_mat = shape[0] if len(shape) == 3 else 1
    return w.reshape(n_mat, int(shape[-1]))


__all__ = ["Entry", "Imatrix", "ImatrixError", "write_imatrix", "read_imatrix", "check_for_model", "weights_for",
           "SUM2", "COUNTS"]
