"""Writing one GGUF file from a per-tensor plan: streamed, atomic, bounded in memory.

A plan is a list of ``PlannedTensor``: the GGUF name, the numpy shape (row-major; ggml's ne is its reverse), the chosen
type and why, and a ``make()`` (or ``chunks()``) that reads the source tensors and returns float32 data in the final
layout. Row blocks of about 8 MB are read, widened and encoded on a thread pool (pread and ``quant.kernels``:
ggml's C quantizer, both release the GIL) and written in order, so memory stays a few blocks whatever the model size.

The file is written to ``.<name>.partial-<pid>`` in the target directory and renamed only when complete; on an
exception, Ctrl-C or SIGTERM the temporary is removed, and a SIGKILL leaves at most a dot-file, never a file at the
final name.
"""
from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..quant import codec, kernels, policy
from ..quant.types import as_ggml, nbytes


@dataclass
class PlannedTensor:
    name: str                          # GGUF tensor name
    shape: tuple[int, ...]             # numpy shape of the final tensor (ggml ne reversed)
    qtype: Any                         # a quant type (QType / GGMLQuantizationType / name)
    reason: str                        # why this type ("policy: ...", "fallback: ...", "range: ...")
    make: Callable[[], np.ndarray] = field(repr=False)  # -> float32 array of `shape`
    sources: tuple[str, ...] = ()      # HF tensor names it is built from
    # Optional: consecutive deferred row blocks covering the tensor, each a function returning float32 [k, ne0],
    # so a large tensor (163840 x 2048 embeddings, 64 stacked experts) never exists whole as float32 and its blocks
    # are read and widened on the encoder threads. Without it, make() is called (in the writing thread).
    blocks: Callable[[], Iterator[Callable[[], np.ndarray]]] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, self.shape)

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclass
class GGUFPlan:
    """Everything one GGUF file will contain: metadata (key -> (value, GGUFValueType or None)) and tensors."""

    arch: str
    kv: dict[str, tuple[Any, Any]]
    tensors: list[PlannedTensor]

    @property
    def data_bytes(self) -> int:
        return sum(gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)


def _add_kv(w: gguf.GGUFWriter, key: str, value: Any, vtype: Any) -> None:
    """Explicit ``vtype`` wins; otherwise the types llama.cpp expects: int -> UINT32, float -> FLOAT32."""
    if isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    elif vtype is not None:
        w.add_key_value(key, value, vtype)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        raise TypeError(f"cannot infer the GGUF type of {key}={value!r}")


@contextmanager
def _cleanup_on_signal(tmp: Path) -> Iterator[None]:
    """Turn SIGTERM into an exception so the temporary file is removed like on Ctrl-C."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.getsignal(signal.SIGTERM)
    in_main = True
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        in_main = False
    try:
        yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


SLICE_BYTES = 8 << 20  # float32 rows per encode job: several per tensor, so every core works on every tensor


def _jobs(t: PlannedTensor) -> Iterator[Callable[[], np.ndarray]]:
    """The tensor as consecutive functions returning float32 row blocks [k, ne0] of at most about SLICE_BYTES
    (quantization blocks never cross a row); deferred blocks are read when a worker calls them."""
    ne0 = t.shape[-1] if t.shape else 1
    if t.blocks is not None:
        yield from t.blocks()
        return
    data = t.make()
    if tuple(data.shape) != tuple(t.shape):
        raise AssertionError(f"{t.name}: produced shape {data.shape}, planned {t.shape}")
    rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, ne0)
    step = max(1, SLICE_BYTES // (4 * ne0))
    for a in range(0, rows.shape[0], step):
        yield (lambda r=rows[a: a + step]: r)


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


class _Overflow(Exception):
    """A slice of tensor ``index`` does not fit its planned type; the tensor is rewritten from ``offset``."""

    def __init__(self, index: int, offset: int, amax: float):
        super().__init__(index, offset, amax)
        self.index, self.offset, self.amax = index, offset, amax


def _encode(block: Callable[[], np.ndarray], ne0: int, qtype: Any) -> tuple[np.ndarray | None, float]:
    """Run on a worker: read/widen the block, then encode it (None and max|x| if it overflows ``qtype``)."""
    rows = np.ascontiguousarray(block(), dtype=np.float32).reshape(-1, ne0)
    try:
        return kernels.encode(rows, qtype), 0.0
    except codec.QuantRangeError:
        return None, codec.max_abs_finite(rows)


def _stream_tensors(w: gguf.GGUFWriter, tensors: list[PlannedTensor], first: int, pool: ThreadPoolExecutor,
                    depth: int, on_bytes: Callable[[int], None] | None) -> None:
    """Encode tensors[first:] on the pool and write them in order (``depth`` slices in flight at most)."""
    fout = w.fout[0]
    pending: deque[tuple[int, Future | None]] = deque()  # (tensor index, encode job); None marks a tensor's end
    start: dict[int, int] = {}
    written: dict[int, int] = {}

    def drain() -> None:
        i, job = pending.popleft()
        if i not in start:  # first output of tensor i: align, remember where it begins
            w.write_padding(fout, fout.tell())
            start[i], written[i] = fout.tell(), 0
        if job is None:
            if written[i] != tensors[i].nbytes:
                raise AssertionError(f"{tensors[i].name}: wrote {written[i]} bytes, planned {tensors[i].nbytes}")
            w.write_padding(fout, written[i])
            return
        raw, amax = job.result()
        if raw is None:
            for _, other in pending:
                if other is not None and not other.cancel():
                    other.result()
            pending.clear()
            raise _Overflow(i, start[i], amax)
        fout.write(memoryview(raw).cast("B"))
        written[i] += raw.nbytes
        if on_bytes is not None:
            on_bytes(raw.nbytes)

    for i in range(first, len(tensors)):
        t = tensors[i]
        ne0 = t.shape[-1] if t.shape else 1
        for block in _jobs(t):
            pending.append((i, pool.submit(_encode, block, ne0, t.qtype)))
            while len(pending) > depth:
                drain()
        pending.append((i, None))
    while pending:
        drain()


def _header_writer(path: Path, plan: GGUFPlan) -> gguf.GGUFWriter:
    """A GGUFWriter on ``path`` with the plan's metadata and tensor infos (types and sizes as planned now)."""
    w = gguf.GGUFWriter(path, plan.arch)
    for key, (value, vtype) in plan.kv.items():
        _add_kv(w, key, value, vtype)
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=as_ggml(t.qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def _rewrite_header(path: Path, plan: GGUFPlan) -> None:
    """Write the header again after a tensor changed type while writing: tensor infos have a fixed size (the type
    and offset are fixed-width fields), so the new header replaces the old one byte for byte."""
    side = path.with_name(path.name + ".header")
    try:
        w = _header_writer(side, plan)
        head_len = w.fout[0].tell()
        w.close()
        data = side.read_bytes()[:head_len]
    finally:
        side.unlink(missing_ok=True)
    with open(path, "r+b") as f:
        f.write(data)


def write_gguf(final: str | Path, plan: GGUFPlan, on_bytes: Callable[[int], None] | None = None,
               threads: int | None = None) -> Path:
    """Write ``plan`` to ``final`` atomically. ``on_bytes(n)`` is called as tensor data is written.

    Row blocks are read, widened and encoded on ``threads`` worker threads (default: every core); this thread
    only plans the jobs and writes their output in the plan's order. A tensor whose values overflow its planned type (F16 past 65504, a block
    scale past the F16 range) is rewritten in place as ``policy.range_safe`` decides (BF16 or F32), its
    ``qtype``/``reason`` in ``plan`` updated and the header rewritten: one pass over the data in the usual case.
    """
    final = Path(final)
    tmp = temp_path(final)
    threads = max(1, threads or os.cpu_count() or 1)
    with _cleanup_on_signal(tmp):
        w = _header_writer(tmp, plan)
        changed = False
        first = 0
        with ThreadPoolExecutor(threads, thread_name_prefix="gguf-encode") as pool:
            while True:
                try:
                    _stream_tensors(w, plan.tensors, first, pool, 2 * threads, on_bytes)
                    break
                except _Overflow as e:
                    t = plan.tensors[e.index]
                    q, why = policy.range_safe(t.qtype, np.array([e.amax], np.float32))
                    t.qtype, t.reason, changed, first = q, f"range: {why}", True, e.index
                    w.fout[0].seek(e.offset)
                    w.fout[0].truncate()
        w.close()
        if changed:
            _rewrite_header(tmp, plan)
        os.replace(tmp, final)
    return final
