"""kimivl_edge.quant: types, numpy codec and metrics against ggml's own C code, torch, and hand computations."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from kimivl_edge.quant import codec, ggml_c, metrics
from kimivl_edge.quant.types import FType, QType, as_ftype, as_qtype, bits_per_weight, nbytes, row_nbytes

needs_ggml = pytest.mark.skipif(not ggml_c.available(), reason="llama-cpp-python's libggml-base not loadable")

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _test_matrix(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Random rows with the awkward cases mixed in: zero rows, -0.0 rows, signed-zero mixes, outliers, ties."""
    a = (rng.standard_normal(shape) * scale).astype(np.float32)
    rows, n = shape
    if rows > 1:
        a[1] = 0.0
    if rows > 2:
        a[2] = -0.0
    if rows > 3:
        a[3, ::2] = -0.0
        a[3, 1::2] = 0.0
    if rows > 4:
        a[4] = np.abs(a[4])
        a[4, ::7] = -0.0  # block minimum is a zero of either sign
    if rows > 5:
        a[5, ::16] *= 1000.0  # one outlier per half block
    if rows > 6:
        a[6] = np.float32(scale) * (np.arange(n) % 17 - 8) / 8  # exact multiples of the scale -> rounding ties
    return a


# ------------------------------------------------------------------------------------------------ types


@needs_ggml
@pytest.mark.parametrize("qt", list(QType))
def test_block_sizes_match_ggml(qt: QType) -> None:
    assert qt.block_size == ggml_c.ggml_blck_size(qt)
    assert qt.type_size == ggml_c.ggml_type_size(qt)
    assert row_nbytes(qt, 2048) == ggml_c.ggml_row_size(qt, 2048)


def test_bits_per_weight_from_block_layouts() -> None:
    # ggml-common.h: q8_0 = f16 + 32 int8 = 34 B/32; q4_0 = f16 + 16 B; q4_K = 2 f16 + 12 + 128 = 144 B/256;
    # q5_K = 176 B/256; q6_K = 128 + 64 + 16 + f16 = 210 B/256; q5_0 = 22 B; q5_1 = 24 B; iq4_nl = 18 B.
    expected = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5,
                "Q5_1": 6.0, "IQ4_NL": 4.5, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}
    for name, bpw in expected.items():
        assert bits_per_weight(name) == bpw
        assert as_qtype(name).bits_per_weight == bpw


def test_nbytes_by_hand() -> None:
    # expert down of Kimi-VL as numpy (64, 2048, 1408): 64*2048 rows of 1408/32 = 44 blocks
    assert nbytes("Q8_0", (64, 2048, 1408)) == 64 * 2048 * 44 * 34
    assert nbytes(QType.Q4_K, (2048, 2048)) == 2048 * 8 * 144
    assert nbytes("F16", (3,)) == 6
    with pytest.raises(ValueError, match="not a multiple"):
        nbytes("Q4_K", (2048, 1408))


def test_ftype_numbers_match_llama_h() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    assert FType.Q4_K_M.llama_ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert FType.Q5_K_M.llama_ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M
    assert FType.Q6_K.llama_ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K
    assert FType.Q8_0.llama_ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert FType.Q4_0.llama_ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert FType.F16.llama_ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    assert FType.BF16.llama_ftype == llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
    assert FType.F32.llama_ftype == llama_cpp.LLAMA_FTYPE_ALL_F32
    assert as_ftype("q4_k_m") is FType.Q4_K_M
    with pytest.raises(ValueError):
        as_ftype("Q3_K_S")


# ------------------------------------------------------------------------------------------------ quantize


@needs_ggml
@pytest.mark.parametrize("qt", BLOCK_TYPES + ["F16", "BF16", "F32"])
@pytest.mark.parametrize("shape", [(1, 32), (9, 64), (12, 1408), (3, 2048)])
@pytest.mark.parametrize("scale", [1e-30, 1e-7, 0.02, 1.0, 300.0])
def test_quantize_bit_exact_vs_ggml(qt: str, shape: tuple[int, int], scale: float) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((qt, shape, scale)).encode()))
    a = _test_matrix(rng, shape, scale)
    ours = codec.quantize(a, qt, strict=False)  # the x1000 outliers overflow F16 scales at scale 300
    ref = ggml_c.quantize(a, qt)
    assert ours.shape == ref.shape == (shape[0], row_nbytes(qt, shape[1]))
    assert np.array_equal(ours, ref)


@needs_ggml
@pytest.mark.parametrize("qt", BLOCK_TYPES + ["F16"])
def test_quantize_overflowing_scales_bit_exact_and_flagged(qt: str) -> None:
    """Huge magnitudes: the F16 block scale (or F16 element) overflows in ggml too; strict mode refuses."""
    rng = np.random.default_rng(7)
    a = _test_matrix(rng, (8, 256), 3e6)
    assert not codec.fits_type(a, qt)
    with pytest.raises(codec.QuantRangeError):
        codec.quantize(a, qt)
    assert np.array_equal(codec.quantize(a, qt, strict=False), ggml_c.quantize(a, qt))


def test_quantize_rejects_bad_rows_and_kquants() -> None:
    with pytest.raises(ValueError, match="multiple"):
        codec.quantize(np.zeros((2, 4304), np.float32), "Q8_0")
    with pytest.raises(NotImplementedError):
        codec.quantize(np.zeros((2, 256), np.float32), "Q4_K")


# ------------------------------------------------------------------------------------------------ dequantize


@needs_ggml
@pytest.mark.parametrize("qt", BLOCK_TYPES + ["F16", "BF16", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"])
def test_dequantize_equals_ggml_to_float(qt: str) -> None:
    rng = np.random.default_rng(11)
    a = _test_matrix(rng, (10, 512), 0.5)
    raw = ggml_c.quantize(a, qt)  # ggml's own bytes, also for the types we cannot quantize
    ours = codec.dequantize(raw, qt, a.shape)
    ref = ggml_c.to_float(raw, qt, a.size).reshape(a.shape)
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_dequantize_hand_built_blocks() -> None:
    """Block layouts of ggml-common.h, values written out by hand."""
    # Q8_0: d = 0.5 (f16 0x3800, little endian), qs = -3, 0, 5, then zeros
    q8 = np.zeros(34, np.uint8)
    q8[0:2] = (0x00, 0x38)
    q8[2:5] = np.array([-3, 0, 5], np.int8).view(np.uint8)
    want = np.zeros(32, np.float32)
    want[:3] = (-1.5, 0.0, 2.5)
    assert np.array_equal(codec.dequantize(q8, "Q8_0", (32,)), want)
    # Q4_0: d = 2.0 (f16 0x4000); byte j holds element j (low nibble) and j+16 (high nibble), value = nibble - 8
    q4 = np.zeros(18, np.uint8)
    q4[0:2] = (0x00, 0x40)
    q4[2:] = 0x88  # all nibbles 8 -> 0
    q4[2] = 0xF0  # element 0: 0-8 = -8; element 16: 15-8 = 7
    want = np.zeros(32, np.float32)
    want[0], want[16] = -16.0, 14.0
    assert np.array_equal(codec.dequantize(q4, "Q4_0", (32,)), want)


@pytest.mark.parametrize("qt", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16", "F32"])
def test_dequantize_rows_matches_full(qt: str) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 5, 64)).astype(np.float32)
    raw = codec.quantize(a, qt)
    full = codec.dequantize(raw, qt, a.shape).reshape(15, 64)
    assert np.array_equal(codec.dequantize_rows(raw, qt, a.shape, slice(4, 11)), full[4:11])
    assert np.array_equal(codec.dequantize_rows(raw, qt, a.shape, [14, 0, 7]), full[[14, 0, 7]])
    assert np.array_equal(codec.dequantize_rows(raw, qt, a.shape, 9), full[9])
    assert np.array_equal(codec.dequantize_rows(raw.tobytes(), qt, a.shape), full)


@needs_ggml
@pytest.mark.parametrize("qt", BLOCK_TYPES + ["F16", "BF16", "Q4_K", "Q6_K"])
def test_dequantize_rows_into_equals_ggml_to_float(qt: str) -> None:
    """Rows [a, b) into a slice of a larger buffer (the vision encoder's use): ggml's floats there, nothing else
    touched."""
    a = _test_matrix(np.random.default_rng(12), (12, 512), 0.5)
    raw = ggml_c.quantize(a, qt).reshape(-1)
    ref = ggml_c.to_float(raw, qt, a.size).reshape(a.shape)
    for lo, hi in ((0, 12), (3, 7), (11, 12), (5, 5)):
        buf = np.full(a.size + 10, 7.0, np.float32)
        codec.dequantize_rows_into(buf[4:4 + (hi - lo) * 512], raw, qt, a.shape, lo, hi)
        assert np.array_equal(buf[4:4 + (hi - lo) * 512].view(np.uint32), ref[lo:hi].reshape(-1).view(np.uint32))
        assert (buf[:4] == 7.0).all() and (buf[4 + (hi - lo) * 512:] == 7.0).all()


def test_dequantize_rows_into_every_half_and_bad_buffers() -> None:
    bits = np.arange(1 << 16).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    codec.dequantize_rows_into(out, bits.view(np.uint8), "F16", (1, bits.size), 0, 1)
    want = bits.view(np.float16).astype(np.float32)  # numpy's IEEE half -> float
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    raw = codec.quantize(np.ones((4, 64), np.float32), "Q8_0")
    with pytest.raises(ValueError):
        codec.dequantize_rows_into(np.empty(64, np.float32), raw, "Q8_0", (4, 64), 0, 2)  # too small
    with pytest.raises(ValueError):
        codec.dequantize_rows_into(np.empty((2, 128), np.float32)[:, ::2], raw, "Q8_0", (4, 64), 0, 2)  # strided
    with pytest.raises(ValueError):
        codec.dequantize_rows_into(np.empty(64, np.float32), raw, "Q8_0", (4, 64), 3, 5)  # past the end
    with pytest.raises(ValueError):
        codec.dequantize_rows_into(np.empty(64, np.float32), raw, "Q8_0", (5, 64), 0, 1)  # wrong data size


# ------------------------------------------------------------------------------------------------ BF16 / F16


def test_bf16_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    parts = [
        rng.standard_normal(4000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 4000),
        # exact ties between two bf16 neighbours (low 16 bits = 0x8000), both parities
        (np.arange(0x3F800000, 0x3F800000 + 64 * 0x10000, 0x10000, dtype=np.uint32) + 0x8000).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 3.3961514e38, -3.4e38, 1e-45, -1e-40], np.float32),
    ]
    x = np.concatenate(parts).astype(np.float32)
    ours = codec.f32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)
    assert np.array_equal(codec.quantize(x.reshape(1, -1), "BF16", strict=False).view(np.uint16)[0], ref)
    back = torch.from_numpy(ref.view(np.int16).copy()).view(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(codec.bf16_to_f32(ours).view(np.uint32), back.view(np.uint32))


@needs_ggml
def test_bf16_nan_rule_is_ggml_s() -> None:
    """A NaN stays NaN, quiet, with its sign and top payload bits (ggml_compute_fp32_to_bf16); torch would write
    0x7FC0 for all of them."""
    nans = np.array([0x7F800001, 0xFFC00000, 0x7FA12345, 0xFF812345, 0x7FFFFFFF], np.uint32).view(np.float32)
    x = np.concatenate([nans, np.zeros(27, np.float32)])
    ours = codec.f32_to_bf16(x)
    assert [int(v) for v in ours[:5]] == [0x7FC0, 0xFFC0, 0x7FE1, 0xFFC1, 0x7FFF]
    assert np.array_equal(ours, ggml_c.quantize(x[None], "BF16").view(np.uint16)[0])


def test_f16_overflow_boundaries() -> None:
    # numpy's IEEE half conversion: 65504 is the top finite value, [65520, ...) rounds to inf
    with np.errstate(over="ignore"):
        assert np.float16(np.float32(65519.996)) == 65504 and np.isinf(np.float16(np.float32(65520.0)))
    assert codec.fits_f16(np.array([65504.0, -65504.0, 1e-10], np.float32))
    assert codec.fits_f16(np.array([np.inf, np.nan, 1.0], np.float32))  # non-finite values are not an overflow
    for v in (65504.5, 65519.996, 65520.0, 1e6):
        assert not codec.fits_f16(np.array([0.0, -v], np.float32)), v
        with pytest.raises(codec.QuantRangeError):
            codec.quantize(np.array([v], np.float32), "F16")
    assert codec.fits_f16(np.zeros(0, np.float32))


def test_legacy_scale_overflow_boundaries() -> None:
    """F16 block scales: Q8_0 d = amax/127, Q4_0 d = amax/8 (stored as F16, overflow at d >= 65520)."""
    def block(v: float) -> np.ndarray:
        b = np.zeros((1, 32), np.float32)
        b[0, 3] = v
        return b

    assert codec.fits_type(block(65504.0 * 127), "Q8_0")
    assert not codec.fits_type(block(65520.0 * 127), "Q8_0")
    assert codec.fits_type(block(-65504.0 * 8), "Q4_0")
    assert not codec.fits_type(block(-65520.0 * 8), "Q4_0")
    assert codec.fits_type(block(1e30), "F32") and codec.fits_type(block(1e30), "BF16")
    assert not codec.fits_type(block(3.4e38), "BF16")  # rounds up to bf16 inf


# ------------------------------------------------------------------------------------------------ metrics


def test_kl_three_way_by_hand() -> None:
    p = np.array([0.5, 0.25, 0.25])
    q = np.array([0.25, 0.5, 0.25])
    # KL(p||q) = 0.5 ln 2 + 0.25 ln(1/2) + 0 = 0.25 ln 2; logits are log-probs plus any per-row constant
    want = 0.25 * math.log(2.0)
    got = metrics.kl_divergence(np.log(q) - 1.0, np.log(p) + 3.0)
    assert got.shape == () and abs(float(got) - want) < 1e-12
    rows = metrics.kl_divergence(np.stack([np.log(q), np.log(p)]), np.stack([np.log(p), np.log(p)]))
    assert np.allclose(rows, [want, 0.0], atol=1e-15, rtol=0)
    assert abs(metrics.mean_kl(np.stack([np.log(q), np.log(p)]), np.stack([np.log(p), np.log(p)])) - want / 2) < 1e-12


def test_kl_argument_order_is_test_then_ref() -> None:
    """(test, ref) like every metric here, and KL(P_ref || P_test): an asymmetric pair tells the order apart."""
    ref, test = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # sum p_ref ln(p_ref / p_test) = 0.511
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # 0.368
    assert abs(want - reverse) > 0.1
    assert abs(float(metrics.kl_divergence(np.log(test), np.log(ref))) - want) < 1e-12
    assert abs(metrics.mean_kl(np.log(test)[None], np.log(ref)[None]) - want) < 1e-12


def test_kl_huge_logits_stable() -> None:
    # softmax([1000, 0]) vs softmax([0, 1000]): KL = 1000 * (1 - 2e^-1000...) ~ 1000 nats
    got = float(metrics.kl_divergence(np.array([1000.0, 0.0]), np.array([0.0, 1000.0])))
    assert abs(got - 1000.0) < 1e-9


def test_cosine_nmse_maxrel_top1_by_hand() -> None:
    assert abs(metrics.cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) - 1 / math.sqrt(2)) < 1e-15
    cos = metrics.cosine_rows(np.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [3.0, 0.0]]),
                              np.array([[2.0, 4.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]))
    assert np.allclose(cos, [1.0, 1.0, 0.0, -1.0], atol=1e-15, rtol=0)
    assert metrics.nmse(np.array([1.0, 2.0]), np.array([1.0, 1.0])) == 0.5  # (0 + 1) / (1 + 1)
    assert metrics.nmse(np.zeros(3), np.zeros(3)) == 0.0
    assert metrics.max_rel_err(np.array([1.0, 3.0]), np.array([2.0, -4.0])) == 7.0 / 4.0
    logits_a = np.array([[0.1, 0.9, 0.0], [5.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    logits_b = np.array([[0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 0.0, 3.5]])
    assert metrics.top1_agreement(logits_a, logits_b) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.nmse(np.zeros(2), np.zeros(3))
