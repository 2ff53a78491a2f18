"""quant.kernels (the converter's encoder) against the numpy codec and ggml's C quantizer, and the parallel writer."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from kimivl_edge.convert.gguf_out import GGUFPlan, PlannedTensor, whole, write_gguf
from kimivl_edge.quant import codec, ggml_c, kernels
from kimivl_edge.quant.types import QType


def _rows(seed: int, n: int = 96, ne0: int = 512) -> np.ndarray:
    r = np.random.default_rng(seed)
    a = (r.standard_normal((n, ne0)) * 0.05).astype(np.float32)
    a[3, :64] = 0.0  # an all-zero block (signed-zero handling)
    a[5, 7] = 2.5  # an outlier
    return a


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0"])
def test_encode_equals_the_numpy_codec(qtype):
    a = _rows(1)
    assert kernels.encode(a, qtype).tobytes() == codec.quantize(a, qtype).tobytes()


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_encode_k_quants_decode_close_to_the_input(qtype):
    a = _rows(2)
    raw = kernels.encode(a, qtype)
    back = ggml_c.to_float(raw.reshape(-1), qtype, a.size).reshape(a.shape)
    rel = np.linalg.norm(back - a) / np.linalg.norm(a)
    assert rel < {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03, "IQ4_NL": 0.12}[qtype]


@pytest.mark.parametrize("qtype,bad", [("F16", 7e4), ("Q8_0", 1e7), ("Q4_0", 6e5)])
def test_encode_refuses_values_that_overflow(qtype, bad):
    a = _rows(3)
    a[1, 1] = bad
    with pytest.raises(codec.QuantRangeError):
        kernels.encode(a, qtype)
    a[1, 1] = np.inf  # non-finite values are not an overflow
    kernels.encode(a, qtype)


@pytest.mark.parametrize("qtype,div", [("Q8_0", 127), ("Q4_0", 8), ("Q5_0", 16)])
@pytest.mark.parametrize("d", [65000.0, 65503.0, 65504.0, 65510.0, 65519.0, 65520.0, 70000.0])
def test_encode_range_check_agrees_with_the_formula_near_the_f16_limit(qtype, div, d):
    """encode checks the F16 scales ggml wrote; near the limit it must decide as codec.fits_type's formula
    (d = max|x| / div in float32, held to 65504) does, whichever sign the extreme value has."""
    for sign in (1.0, -1.0):
        a = _rows(4)
        a[2, 9] = sign * np.float32(d) * np.float32(div)
        if codec.fits_type(a, qtype):
            assert kernels.encode(a, qtype).tobytes() == codec.quantize(a, qtype).tobytes()
        else:
            with pytest.raises(codec.QuantRangeError):
                kernels.encode(a, qtype)


def test_max_abs_finite_ignores_nan_and_inf():
    a = np.array([[1.0, -3.0, np.nan, np.inf, -np.inf]], np.float32)
    assert codec.max_abs_finite(a) == 3.0
    assert codec.max_abs_finite(np.array([[-2.0, 1.0]], np.float32)) == 2.0
    assert codec.max_abs_finite(np.array([[np.nan, -np.inf]], np.float32)) == 0.0
    assert codec.max_abs_finite(np.zeros((0, 4), np.float32)) == 0.0


def _deferred(a: np.ndarray, rows: int):
    """``a`` as deferred row blocks of ``rows`` rows (the converter's reading path), widened only when called."""
    return lambda: ((lambda s=s: a[s: s + rows].copy()) for s in range(0, a.shape[0], rows))


def _plan(tensors: dict[str, tuple[np.ndarray, QType]], deferred: int = 0) -> GGUFPlan:
    """Every other tensor given as deferred blocks of ``deferred`` rows (if nonzero), the rest made whole."""
    return GGUFPlan("llama", {}, [PlannedTensor(n, a.shape, q, "test",
                                                blocks=_deferred(a, deferred) if deferred and i % 2 else
                                                whole(lambda a=a: a, a.shape))
                                  for i, (n, (a, q)) in enumerate(tensors.items())])


def test_parallel_writer_gives_the_same_file_as_one_thread(tmp_path, monkeypatch):
    import kimivl_edge.convert.gguf_out as go

    monkeypatch.setattr(go, "SLICE_BYTES", 4096)  # many slices per tensor, across tensor boundaries
    ts = {f"t{i}": (_rows(10 + i, n=40 + 13 * i, ne0=256), q)
          for i, q in enumerate([QType.Q8_0, QType.F16, QType.Q4_K, QType.F32, QType.Q4_0, QType.Q6_K])}
    one = write_gguf(tmp_path / "one.gguf", _plan(ts), threads=1).path
    four = write_gguf(tmp_path / "four.gguf", _plan(ts, deferred=7), threads=4).path  # blocks read on the workers
    assert one.read_bytes() == four.read_bytes()
    got = {t.name: t for t in gguf.GGUFReader(four).tensors}
    for n, (a, q) in ts.items():
        assert np.asarray(got[n].data).tobytes() == kernels.encode(a, q).tobytes(), n


def test_writer_switches_an_overflowing_tensor_and_rewrites_the_header(tmp_path, monkeypatch):
    import kimivl_edge.convert.gguf_out as go

    monkeypatch.setattr(go, "SLICE_BYTES", 4096)
    big = _rows(20, n=64, ne0=256)
    big[50, 3] = 1e5  # past F16, found in a late slice, after earlier slices were written
    ts = {"a": (_rows(21, ne0=256), QType.Q8_0), "b": (big, QType.F16), "c": (_rows(22, ne0=256), QType.Q4_0)}
    plan = _plan(ts, deferred=9)  # "b" comes in deferred blocks: the overflow is found on a worker
    report = write_gguf(tmp_path / "x.gguf", plan, threads=2)
    b = report.tensors[1]
    assert b.qtype == QType.BF16 and b.range_fallback.startswith("range") and b.nbytes == big.size * 2
    assert report.range_fallbacks == (b,)
    assert plan.tensors[1].qtype == QType.F16 and plan.tensors[1].reason == "test"  # the plan is not changed
    assert report.file_bytes == (tmp_path / "x.gguf").stat().st_size
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    assert got["b"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert np.asarray(got["b"].data).tobytes() == codec.quantize(big, QType.BF16).tobytes()
    for n in ("a", "c"):
        assert np.asarray(got[n].data).tobytes() == kernels.encode(*ts[n]).tobytes()


def test_mmproj_style_plan_falls_back_to_f32(tmp_path):
    """``bf16_fallback=False`` (the mmproj): an overflowing tensor is written F32, the same check as the text file."""
    big = _rows(23, n=8, ne0=256)
    big[1, 2] = 1e5
    t = PlannedTensor("m", big.shape, QType.F16, "test", blocks=whole(lambda: big, big.shape))
    plan = GGUFPlan("clip", {}, [t], bf16_fallback=False)
    report = write_gguf(tmp_path / "m.gguf", plan, threads=1)
    assert report.tensors[0].qtype == QType.F32 and "F16 -> F32" in report.tensors[0].range_fallback
    got = next(iter(gguf.GGUFReader(report.path).tensors))
    assert np.array_equal(np.asarray(got.data).reshape(big.shape), big)


def test_plan_is_frozen():
    plan = _plan({"a": (_rows(1, n=8, ne0=64), QType.Q8_0)})
    with pytest.raises(AttributeError):
        plan.tensors[0].qtype = QType.F32  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.kv = {}  # type: ignore[misc]
