"""Writing one GGUF file from a per-tensor plan: streamed, atomic, bounded in memory.

A plan is a list of ``PlannedTensor``: the GGUF name, the numpy shape (row-major; ggml's ne is its reverse), the chosen
type and why, and a ``make()`` that reads the source tensors (memory-mapped) and returns float32 data in the final
layout. Tensors are produced, quantized and written one at a time, so peak memory is one tensor, not the model.

The file is written to ``.<name>.partial-<pid>`` in the target directory and renamed only when complete; on an
exception, Ctrl-C or SIGTERM the temporary is removed, and a SIGKILL leaves at most a dot-file, never a file at the
final name.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..quant import codec
from ..quant.types import as_ggml, nbytes


@dataclass
class PlannedTensor:
    name: str                          # GGUF tensor name
    shape: tuple[int, ...]             # numpy shape of the final tensor (ggml ne reversed)
    qtype: Any                         # a quant type (QType / GGMLQuantizationType / name)
    reason: str                        # why this type ("policy: ...", "fallback: ...", "range: ...")
    make: Callable[[], np.ndarray] = field(repr=False)  # -> float32 array of `shape`
    sources: tuple[str, ...] = ()      # HF tensor names it is built from
    # Optional: consecutive float32 row blocks [k, ne0] covering the tensor, so a large tensor (163840 x 2048
    # embeddings, 64 stacked experts) never exists whole as float32. Without it, make() is called.
    chunks: Callable[[], Iterator[np.ndarray]] | None = field(default=None, repr=False)

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


CHUNK_BYTES = 64 << 20  # float32 rows quantized at a time


def _row_blocks(t: PlannedTensor) -> Iterator[np.ndarray]:
    """The tensor as consecutive float32 row blocks [k, ne0] (quantization blocks never cross a row)."""
    ne0 = t.shape[-1] if t.shape else 1
    if t.chunks is not None:
        n = 0
        for block in t.chunks():
            block = np.ascontiguousarray(block, dtype=np.float32).reshape(-1, ne0)
            n += block.shape[0]
            yield block
        if n * ne0 != int(np.prod(t.shape)):
            raise AssertionError(f"{t.name}: chunks gave {n} rows of {ne0}, planned {t.shape}")
        return
    data = t.make()
    if tuple(data.shape) != tuple(t.shape):
        raise AssertionError(f"{t.name}: produced shape {data.shape}, planned {t.shape}")
    rows = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, ne0)
    step = max(1, CHUNK_BYTES // (4 * ne0))
    for a in range(0, rows.shape[0], step):
        yield rows[a: a + step]


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def write_gguf(final: str | Path, plan: GGUFPlan, on_bytes: Callable[[int], None] | None = None) -> Path:
    """Write ``plan`` to ``final`` atomically. ``on_bytes(n)`` is called as tensor data is written."""
    final = Path(final)
    tmp = temp_path(final)
    with _cleanup_on_signal(tmp):
        w = gguf.GGUFWriter(tmp, plan.arch)
        for key, (value, vtype) in plan.kv.items():
            _add_kv(w, key, value, vtype)
        for t in plan.tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=as_ggml(t.qtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        for t in plan.tensors:
            w.write_padding(fout, fout.tell())  # data alignment, as GGUFWriter.write_tensor_data does
            written = 0
            for rows in _row_blocks(t):
                raw = codec.quantize(rows, t.qtype)
                fout.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
                written += raw.nbytes
                if on_bytes is not None:
                    on_bytes(raw.nbytes)
            if written != t.nbytes:
                raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
            w.write_padding(fout, written)
        w.close()
        os.replace(tmp, final)
    return final
