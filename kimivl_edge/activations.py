"""Squared-activation statistics of every linear layer, read from llama.cpp's graph as it runs (its eval callback,
``cb_eval`` in the context parameters), as llama.cpp's own ``llama-imatrix`` collects them
(tools/imatrix/imatrix.cpp ``collect_imatrix``, llama.cpp vendored in llama-cpp-python 0.3.36):

* ``MUL_MAT`` with a ``blk.*`` weight and an F32 input: per row of the input, ``x * x`` is added to the weight's
  sums (one row per matrix of a 3-D weight: MLA's ``attn_k_b`` / ``attn_v_b`` hold one matrix per head), and the
  count grows by the input's rows per matrix; one count per weight.
* ``MUL_MAT_ID`` (the routed experts): for each token and each of its selected experts, the token's input row is
  added to that expert's sums and that expert's count grows by one, so an expert sees only the tokens routed to it.

One difference: llama-imatrix skips ``MUL_MAT`` inputs of fewer than 16 rows (a heuristic it does not explain);
here every evaluated row counts, so a short calibration chat counts whole. Sums are kept in float64.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .errors import KimiVLError
from .quant.ggml_c import library_path
from .quant.imatrix_file import Entry

_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64  # ggml.h
_GGML_TYPE_F32 = 0
_OBJECT_SIZE = 32  # sizeof(struct ggml_object)
_MATMULS = ("MUL_MAT", "MUL_MAT_ID")


class GgmlTensor(ctypes.Structure):
    """Mirror of ``struct ggml_tensor`` (ggml/include/ggml.h, llama-cpp-python 0.3.36); its size is checked against
    ``ggml_tensor_overhead()`` before use."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * _MAX_DIMS),
        ("nb", ctypes.c_size_t * _MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * _MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * _MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    if lib.ggml_tensor_overhead() != _OBJECT_SIZE + ctypes.sizeof(GgmlTensor):
        raise KimiVLError("this llama-cpp-python's ggml_tensor layout is not the one the imatrix collector knows")
    return lib


def weight_name(name: bytes) -> str:
    """llama-imatrix's ``filter_tensor_name``: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    s = name.decode("utf-8", "replace")
    if "#" in s:
        s = s.split("#")[1]
    return s


def _array(ptr: int, t: GgmlTensor, dtype: type) -> np.ndarray:
    """A copy of a tensor's data as numpy [ne3, ne2, ne1, ne0], with its strides (views need not be contiguous)."""
    lib = _ggml()
    n = lib.ggml_nbytes(ptr)
    buf = np.empty(n, np.uint8)
    lib.ggml_backend_tensor_get(ptr, buf.ctypes.data, 0, n)
    return np.ndarray(tuple(reversed(t.ne[:])), dtype, buf, 0, tuple(reversed(t.nb[:])))


@dataclass
class _Stat:
    sums: np.ndarray    # float64 [n_mat, ne0]
    counts: np.ndarray  # int64 [n_counts]: 1 for MUL_MAT, n_mat for MUL_MAT_ID


@dataclass
class Collector:
    """Accumulates the statistics; ``callback`` is the ctypes function to give llama.cpp (keep this object alive
    while the context lives). An error inside the callback, or ``stop()``, stops the evaluation; ``check`` raises
    it."""

    stats: dict[str, _Stat] = field(default_factory=dict, repr=False)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        import llama_cpp

        lib = _ggml()
        self._op_names: dict[int, str] = {}
        self._lib = lib
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._call)

    def _op(self, op: int) -> str:
        name = self._op_names.get(op)
        if name is None:
            name = self._op_names[op] = self._lib.ggml_op_name(op).decode()
        return name

    def _call(self, ptr: int, ask: bool, user_data: object) -> bool:
        if self.error is not None:  # stopped: collect nothing more until ``check`` raises it
            return False
        try:
            t = GgmlTensor.from_address(ptr)
            op = self._op(t.op)
            src0 = GgmlTensor.from_address(t.src[0]) if op in _MATMULS else None
            wanted = (src0 is not None and weight_name(src0.name).startswith("blk.")
                      and (op == "MUL_MAT_ID" or GgmlTensor.from_address(t.src[1]).type == _GGML_TYPE_F32))
            if ask or not wanted or src0 is None:
                return wanted if ask else True  # ask: do we want this node's data; else: go on computing
            (self._mul_mat_id if op == "MUL_MAT_ID" else self._mul_mat)(t, src0)
            return True
        except BaseException as e:  # noqa: B036 (a ctypes callback cannot raise: stop the graph, re-raise later)
            self.error = self.error or e
            return False

    def _stat(self, name: str, n_mat: int, ne0: int, n_counts: int) -> _Stat:
        s = self.stats.get(name)
        if s is None:
            s = self.stats[name] = _Stat(np.zeros((n_mat, ne0)), np.zeros(n_counts, np.int64))
        elif s.sums.shape != (n_mat, ne0) or s.counts.shape != (n_counts,):
            raise KimiVLError(f"{name}: inconsistent input sizes between evaluations")
        return s

    def _mul_mat(self, t: GgmlTensor, src0: GgmlTensor) -> None:
        name = weight_name(src0.name)
        ne02, ne03 = int(src0.ne[2]), int(src0.ne[3])
        x = _array(t.src[1], GgmlTensor.from_address(t.src[1]), np.float32).astype(np.float64)  # [i3, i2, row, j]
        s = self._stat(name, ne02 * ne03, x.shape[-1], 1)
        sq = (x * x).sum(axis=2)  # [i3, i2, j]
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                s.sums[(i3 % ne03) * ne02 + (i2 % ne02)] += sq[i3, i2]
        s.counts += x.shape[0] * x.shape[1] * x.shape[2] // (ne02 * ne03)
        _check_finite(name, s.sums)

    def _mul_mat_id(self, t: GgmlTensor, src0: GgmlTensor) -> None:
        name = weight_name(src0.name)
        n_as = int(src0.ne[2])
        src1 = GgmlTensor.from_address(t.src[1])
        ids_t = GgmlTensor.from_address(t.src[2])
        x = _array(t.src[1], src1, np.float32)[0].astype(np.float64)  # [n_tokens, ne11, ne10]
        ids = _array(t.src[2], ids_t, np.int32)[0, 0]                  # [n_tokens, n_ids]
        if ids.shape[0] != x.shape[0] or src1.ne[3] != 1:
            raise KimiVLError(f"{name}: unexpected MUL_MAT_ID shapes")
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise KimiVLError(f"{name}: expert id out of range")
        s = self._stat(name, n_as, x.shape[-1], n_as)
        for slot in range(ids.shape[1]):
            rows = x[:, slot % x.shape[1], :]
            np.add.at(s.sums, ids[:, slot], rows * rows)
            s.counts += np.bincount(ids[:, slot], minlength=n_as)
        _check_finite(name, s.sums)

    def stop(self, reason: BaseException) -> None:
        """Stop collecting (a SIGINT handler calls this: an exception raised inside the ctypes callback's frame
        would be dropped by ctypes); ``check`` raises ``reason``."""
        self.error = self.error or reason

    def check(self) -> None:
        """Raise the error that stopped an evaluation, if any."""
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def entries(self) -> dict[str, Entry]:
        """The statistics in the file's form: sums [n_counts, ne0 * n_mat / n_counts] float32, counts."""
        return {n: Entry(s.sums.reshape(len(s.counts), -1).astype(np.float32), s.counts.copy())
                for n, s in self.stats.items()}


def _check_finite(name: str, sums: np.ndarray) -> None:
    if not np.isfinite(sums).all():
        raise KimiVLError(f"non-finite activations reached {name}; the model or its inputs are broken")
