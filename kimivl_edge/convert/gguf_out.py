"""Writing one GGUF file from a per-tensor plan: streamed, atomic, bounded in memory.

A ``GGUFPlan`` (frozen: what will be written) holds the metadata and a ``PlannedTensor`` per tensor: the GGUF
name, the numpy shape (row-major; ggml's ne is its reverse), the planned type and why, and ``blocks()``, the
tensor's float32 data in the final layout as consecutive deferred row blocks. Row blocks of about 8 MB are read,
widened and encoded on a thread pool (pread and ``quant.kernels``: ggml's C quantizer, both release the GIL) and
written in order, so memory stays a few blocks whatever the model size. ``write_gguf`` returns a ``WriteReport``
(what was written): the plan's types, except where a tensor's values overflowed its planned type. That range check
is made here, while writing, for every file alike (``quant.policy.range_fallback``): finding it earlier would take
another pass over the checkpoint.

Non-finite values (NaN, Inf) are counted per tensor in the same pass, as each block is widened; the report carries
the counts and the caller decides (the converter refuses them unless asked not to).

The file is written to ``.<name>.partial-<pid>`` in the target directory and renamed only when complete
(``partial_files`` does this for several files together: all are renamed, or none); on an exception, Ctrl-C or
SIGTERM the temporaries are removed, and a SIGKILL leaves at most dot-files, never a file at the final name.
"""
from __future__ import annotations

import math
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property, partial
from io import BufferedWriter, BytesIO
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from ..quant import codec, kernels, policy
from ..quant.types import QType, nbytes


Block = Callable[[], np.ndarray]  # a deferred row block: returns float32 [k, ne0]


@dataclass(frozen=True)
class Weighted:
    """A deferred row block whose rows all belong to one matrix of a weight quantized with an importance matrix
    (one expert of a stacked expert tensor, one head of MLA's 3-D attn_k_b): ``weights`` (float32 [ne0]) are that
    matrix's importance weights, given to ggml's quantizer with the rows, as llama_model_quantize does."""

    rows: Block
    weights: np.ndarray

    def __call__(self) -> np.ndarray:
        return self.rows()


@dataclass(frozen=True)
class PlannedTensor:
    name: str                          # GGUF tensor name
    shape: tuple[int, ...]             # numpy shape of the final tensor (ggml ne reversed)
    qtype: QType                       # the planned type
    reason: str                        # why this type ("policy: ...", "fallback: ...")
    # Consecutive deferred row blocks covering the tensor: a large tensor (163840 x 2048 embeddings, 64 stacked
    # experts) never exists whole as float32, and its blocks are read and widened on the encoder threads. A tensor
    # that must be built whole (a split or permuted source) comes through ``whole``.
    blocks: Callable[[], Iterable[Block]] = field(repr=False, compare=False)
    sources: tuple[str, ...] = ()      # HF tensor names it is built from
    weighted: bool = False             # quantized with importance weights (its blocks are ``Weighted``)

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, self.shape)

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class GGUFPlan:
    """Everything one GGUF file will contain: metadata (key -> (value, GGUFValueType or None)) and tensors.
    ``bf16_fallback``: a tensor whose values overflow its planned type is written BF16 (if BF16 holds them) rather
    than F32 (the text file; the mmproj types have no BF16)."""

    arch: str
    kv: Mapping[str, tuple[Any, Any]]
    tensors: tuple[PlannedTensor, ...]
    bf16_fallback: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))

    @property
    def data_bytes(self) -> int:
        return sum(gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for t in self.tensors)

    @cached_property
    def header_bytes(self) -> int:
        """The header, metadata and tensor index as planned, padded to the data alignment (gguf's own packing)."""
        w = _SizingWriter(None, self.arch)
        _fill(w, self, [t.qtype for t in self.tensors])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        return gguf.GGUFWriter.ggml_pad(_out(w).tell(), gguf.GGUF_DEFAULT_ALIGNMENT)

    @property
    def file_bytes(self) -> int:
        """The file's size as planned (a range fallback, found while writing, adds to it)."""
        return self.header_bytes + self.data_bytes

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


@dataclass(frozen=True)
class WrittenTensor:
    name: str
    shape: tuple[int, ...]
    qtype: QType                       # the type written
    nbytes: int
    range_fallback: str = ""           # why ``qtype`` is not the planned type (its values overflowed it), else ""
    nan: int = 0                       # NaN values in the source data
    inf: int = 0                       # +-Inf values in the source data


@dataclass(frozen=True)
class WriteReport:
    """What ``write_gguf`` wrote: the file, its size and every tensor's written type."""

    path: Path
    file_bytes: int
    tensors: tuple[WrittenTensor, ...]

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def range_fallbacks(self) -> tuple[WrittenTensor, ...]:
        """The tensors written in another type than planned."""
        return tuple(t for t in self.tensors if t.range_fallback)

    @property
    def nonfinite(self) -> tuple[WrittenTensor, ...]:
        """The tensors whose source holds NaN or Inf values."""
        return tuple(t for t in self.tensors if t.nan or t.inf)


def whole(make: Callable[[], np.ndarray], shape: tuple[int, ...]) -> Callable[[], Iterator[Block]]:
    """``blocks`` of a tensor built whole by ``make()`` (float32 of ``shape``): called when the writer reaches the
    tensor (in its thread), then cut into row blocks of about ``SLICE_BYTES``."""
    def blocks() -> Iterator[Block]:
        data = make()
        if tuple(data.shape) != tuple(shape):
            raise AssertionError(f"produced shape {data.shape}, planned {shape}")
        ne0 = shape[-1] if shape else 1
        rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, ne0)
        step = max(1, SLICE_BYTES // (4 * ne0))
        for a in range(0, rows.shape[0], step):
            yield partial(np.asarray, rows[a: a + step])
    return blocks


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
def _cleanup_on_signal(tmps: Sequence[Path]) -> Iterator[None]:
    """Turn SIGTERM into an exception so the temporary files are removed like on Ctrl-C."""
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
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + ".header").unlink(missing_ok=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


SLICE_BYTES = 8 << 20  # float32 rows per encode job: several per tensor, so every core works on every tensor


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


@contextmanager
def partial_files(finals: Sequence[Path]) -> Iterator[list[Path]]:
    """The temporary names of ``finals`` (``temp_path``); when the block completes all are renamed to their final
    names, on an exception, Ctrl-C or SIGTERM all are removed and no final file is touched."""
    tmps = [temp_path(Path(f)) for f in finals]
    with _cleanup_on_signal(tmps):
        yield tmps
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)


class _Overflow(Exception):
    """A slice of tensor ``index`` does not fit its type; the tensor is rewritten from ``offset``."""

    def __init__(self, index: int, offset: int, amax: float):
        super().__init__(index, offset, amax)
        self.index, self.offset, self.amax = index, offset, amax


def _nonfinite(rows: np.ndarray) -> tuple[int, int]:
    """(NaN count, Inf count) of a block."""
    bad = rows.size - int(np.count_nonzero(np.isfinite(rows)))
    if not bad:
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(rows)))
    return nan, bad - nan


def _encode(block: Block, ne0: int, qtype: QType) -> tuple[np.ndarray | None, float, tuple[int, int]]:
    """Run on a worker: read/widen the block, count its NaN and Inf, then encode it (None and max|x| if it
    overflows ``qtype``)."""
    rows = np.ascontiguousarray(block(), dtype=np.float32).reshape(-1, ne0)
    counts = _nonfinite(rows)
    weights = block.weights if isinstance(block, Weighted) else None
    try:
        return kernels.encode(rows, qtype, weights), 0.0, counts
    except codec.QuantRangeError:
        return None, codec.max_abs_finite(rows), counts


def _stream_tensors(w: gguf.GGUFWriter, tensors: tuple[PlannedTensor, ...], types: list[QType], first: int,
                    pool: ThreadPoolExecutor, depth: int, on_bytes: Callable[[int], object] | None,
                    nonfinite: dict[int, tuple[int, int]]) -> None:
    """Encode tensors[first:] as ``types`` on the pool and write them in order (``depth`` slices in flight at most);
    ``nonfinite[i]`` gets tensor i's (NaN, Inf) counts."""
    fout = _out(w)
    pending: deque[tuple[int, Future | None]] = deque()  # (tensor index, encode job); None marks a tensor's end
    start: dict[int, int] = {}
    written: dict[int, int] = {}

    def drain() -> None:
        i, job = pending.popleft()
        if i not in start:  # first output of tensor i: align, remember where it begins
            w.write_padding(fout, fout.tell())
            start[i], written[i], nonfinite[i] = fout.tell(), 0, (0, 0)
        if job is None:
            want = nbytes(types[i], tensors[i].shape)
            if written[i] != want:
                raise AssertionError(f"{tensors[i].name}: wrote {written[i]} bytes, planned {want}")
            w.write_padding(fout, written[i])
            return
        raw, amax, (nan, inf) = job.result()
        nonfinite[i] = (nonfinite[i][0] + nan, nonfinite[i][1] + inf)
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
        for block in t.blocks():
            pending.append((i, pool.submit(_encode, block, ne0, types[i])))
            while len(pending) > depth:
                drain()
        pending.append((i, None))
    while pending:
        drain()


class _SizingWriter(gguf.GGUFWriter):
    """A GGUFWriter whose "file" is in memory: the header's exact size, packed by gguf's own code."""

    def open_output_file(self, path: Path | None = None) -> None:
        self.fout = [cast(BufferedWriter, BytesIO())]  # written, then only tell()
        self.state = WriterState.EMPTY


def _out(w: gguf.GGUFWriter) -> BufferedWriter:
    """The writer's one output file (after ``write_header_to_file``)."""
    if w.fout is None:
        raise AssertionError("the GGUF writer has no open file")
    return w.fout[0]


def _fill(w: gguf.GGUFWriter, plan: GGUFPlan, types: list[QType]) -> None:
    """The plan's metadata and tensor infos, tensor i of type ``types[i]``."""
    for key, (value, vtype) in plan.kv.items():
        _add_kv(w, key, value, vtype)
    for t, q in zip(plan.tensors, types):
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(q, t.shape), raw_dtype=q.ggml)


def _header_writer(path: Path, plan: GGUFPlan, types: list[QType]) -> gguf.GGUFWriter:
    """A GGUFWriter on ``path`` with the plan's metadata and tensor infos written, tensor i of type ``types[i]``."""
    w = gguf.GGUFWriter(path, plan.arch)
    _fill(w, plan, types)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    except BaseException:
        with suppress(OSError):  # a full disk fails the close's flush too; the file is closed all the same
            w.close()
        raise
    return w


def _rewrite_header(path: Path, plan: GGUFPlan, types: list[QType]) -> None:
    """Write the header again after a tensor changed type while writing: tensor infos have a fixed size (the type
    and offset are fixed-width fields), so the new header replaces the old one byte for byte."""
    side = path.with_name(path.name + ".header")
    try:
        w = _header_writer(side, plan, types)
        head_len = _out(w).tell()
        w.close()
        data = side.read_bytes()[:head_len]
    finally:
        side.unlink(missing_ok=True)
    with open(path, "r+b") as f:
        f.write(data)


def write_gguf(final: str | Path, plan: GGUFPlan, on_bytes: Callable[[int], object] | None = None,
               threads: int | None = None) -> WriteReport:
    """Write ``plan`` to ``final`` atomically (``partial_files``) and report what was written (``write_partial``)."""
    final = Path(final)
    with partial_files([final]) as (tmp,):
        return write_partial(tmp, final, plan, on_bytes, threads)


def write_partial(tmp: Path, final: Path, plan: GGUFPlan, on_bytes: Callable[[int], object] | None = None,
                  threads: int | None = None) -> WriteReport:
    """Write ``plan`` to ``tmp`` (to be renamed ``final`` by the caller) and report what was written.
    ``on_bytes(n)`` is called as tensor data is written.

    Row blocks are read, widened and encoded on ``threads`` worker threads (default: every core); this thread only
    plans the jobs and writes their output in the plan's order. A tensor whose values overflow its planned type
    (F16 past 65504, a block scale past the F16 range) is rewritten in place in the type
    ``policy.range_fallback`` gives (BF16 or F32, see ``GGUFPlan.bf16_fallback``) and the header rewritten: one
    pass over the data in the usual case. The plan is not changed; the report says which tensors fell back and why,
    and which hold NaN or Inf.
    """
    threads = max(1, threads or os.cpu_count() or 1)
    types = [t.qtype for t in plan.tensors]
    fallbacks: dict[int, str] = {}
    nonfinite: dict[int, tuple[int, int]] = {}
    w = _header_writer(tmp, plan, types)
    try:
        first = 0
        with ThreadPoolExecutor(threads, thread_name_prefix="gguf-encode") as pool:
            while True:
                try:
                    _stream_tensors(w, plan.tensors, types, first, pool, 2 * threads, on_bytes, nonfinite)
                    break
                except _Overflow as e:
                    q, why = policy.range_fallback(types[e.index], e.amax, bf16_ok=plan.bf16_fallback)
                    types[e.index], fallbacks[e.index], first = q, f"range: {why}", e.index
                    _out(w).seek(e.offset)
                    _out(w).truncate()
    except BaseException:
        with suppress(OSError):  # the error in flight is the one to report, not the close's
            w.close()
        raise
    w.close()
    if fallbacks:
        _rewrite_header(tmp, plan, types)
    written = tuple(WrittenTensor(t.name, t.shape, q, nbytes(q, t.shape), fallbacks.get(i, ""), *nonfinite[i])
                    for i, (t, q) in enumerate(zip(plan.tensors, types)))
    return WriteReport(final, tmp.stat().st_size, written)
