"""Numpy encode/decode of GGUF tensor data (docs/model.md §11).

* ``quantize``: F32 / F16 / BF16 here; the 32-block legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) through gguf-py's
  ``gguf.quants`` (bit-exact with ggml's reference quantizers). K-quants and IQ4_NL have no numpy quantizer: the
  converter encodes every quantized type with ggml's own C quantizer (``quant.kernels`` over ``quant.ggml_c``),
  and this codec is its fallback without the library and the tests' second oracle.
* ``dequantize`` / ``dequantize_rows`` / ``dequantize_rows_into``: every type gguf-py can decode;
  F32/F16/BF16/Q8_0/Q4_0 use direct vectorised formulas from the block layouts in ggml-common.h (the runtime's
  on-the-fly path: ``dequantize_rows_into`` decodes rows straight into a caller's buffer), the rest gguf-py.
* bf16: ``bf16_to_f32`` (exact widening) and ``f32_to_bf16`` (round to nearest even, ggml's NaN rule), the one
  definition of each for GGUF tensors and safetensors checkpoints alike.
* Range checks: ``fits_f16`` and ``fits_type`` (does storing an array as a type keep every finite value finite,
  including the F16 block scales of the quantized types).

Output of ``quantize`` is the raw GGUF payload as uint8 of numpy shape ``(*shape[:-1], row_bytes)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq

from .types import QTypeLike, as_ggml, block_size, row_nbytes, type_size

__all__ = [
    "F16_MAX",
    "F16_OVERFLOW",
    "QuantRangeError",
    "quantize",
    "dequantize",
    "dequantize_rows",
    "dequantize_rows_into",
    "f32_to_bf16",
    "bf16_to_f32",
    "fits_f16",
    "fits_type",
    "max_abs_finite",
]

F16_MAX = 65504.0
"""Largest finite IEEE half."""
F16_OVERFLOW = 65520.0
"""Smallest magnitude that rounds (to nearest even) to half infinity; (65504, 65520) rounds down to 65504."""

_LEGACY = (GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1)
# Conservative upper bounds on max|x| for types whose F16 scales come out of an iterative fit (ggml-quants.c):
# Q4_K/Q5_K: dmin = max(-min)/63 -> |x| <= 63*65504; Q6_K: d ~ amax/(31*128); IQ4_NL: d ~ amax/120. Halved
# for margin, since the least-squares refinement can move a scale a little past the simple estimate.
_ITERATIVE_AMAX_LIMIT = {
    GT.Q4_K: 63 * F16_MAX / 2,
    GT.Q5_K: 63 * F16_MAX / 2,
    GT.Q6_K: 31 * 128 * F16_MAX / 2,
    GT.IQ4_NL: 120 * F16_MAX / 2,
}


class QuantRangeError(ValueError):
    """Finite input values would become inf/NaN in the requested storage type."""


# --------------------------------------------------------------------------------------------- element types


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; a NaN stays NaN, forced quiet with its sign
    and top payload bits kept (ggml-impl.h ``ggml_compute_fp32_to_bf16``, what a GGUF BF16 tensor holds). torch's
    ``.to(torch.bfloat16)`` gives the same bits for every non-NaN value (tests/test_quant.py); it writes every NaN
    as 0x7FC0."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u.astype(np.uint64) + (np.uint64(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint64(16)
    quiet = (u >> np.uint32(16)) | np.uint32(64)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: a bf16 value is the top half of the float32 with the same
    bits (one pass, no temporary)."""
    out = np.empty(np.shape(bits), np.uint32)
    np.left_shift(np.asarray(bits, dtype=np.uint16), 16, out=out, dtype=np.uint32)
    return out.view(np.float32)


def max_abs_finite(a: np.ndarray) -> float:
    """max |x| over the finite elements (0.0 if there are none): two reductions and no temporary when every value
    is finite (the usual case: the converter's encoder asks this of every block)."""
    a = np.asarray(a, dtype=np.float32)
    hi, lo = float(a.max(initial=-np.inf)), float(a.min(initial=np.inf))
    if np.isfinite(hi) and np.isfinite(lo):
        return max(hi, -lo, 0.0)
    return float(np.abs(a[np.isfinite(a)]).max(initial=0.0))


def fits_f16(a: np.ndarray) -> bool:
    """True if every finite value has |x| <= 65504 (values >= 65520 would round to inf; the brief treats the
    sub-ulp band (65504, 65520) as out of range too, so no finite value is ever silently clipped)."""
    return max_abs_finite(a) <= F16_MAX


def _legacy_scales_fit(a: np.ndarray, t: GT) -> bool:
    """Check that the F16 block fields ggml writes for a 32-block legacy type stay finite.

    Formulas from ggml-quants.c ``quantize_row_*_ref`` (float32 math): Q8_0 d = amax/127; Q4_0 d = max/-8;
    Q5_0 d = max/-16 -- the largest d comes from the global max|x|, so one number decides exactly, whatever the
    shape. Q4_1 d = (max-min)/15, Q5_1 d = (max-min)/31, both with m = min: exact per block when the rows split
    into 32-blocks, else bounded conservatively by the global range and max|x|. Non-finite elements are ignored.
    """
    x = np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        if t in (GT.Q8_0, GT.Q4_0, GT.Q5_0):
            div = {GT.Q8_0: 127, GT.Q4_0: 8, GT.Q5_0: 16}[t]
            fields = [np.float32(max_abs_finite(x)) / np.float32(div)]
        else:
            div = np.float32(15 if t == GT.Q4_1 else 31)
            if x.ndim >= 1 and x.shape[-1] % 32 == 0:
                blocks = x.reshape(-1, 32)
                blocks = blocks[np.isfinite(blocks).all(axis=1)]
                lo, hi = blocks.min(axis=1, initial=np.inf), blocks.max(axis=1, initial=-np.inf)
                fields = [(hi - lo) / div, lo]
            else:
                fin = x[np.isfinite(x)]
                if fin.size == 0:
                    return True
                lo, hi = fin.min(), fin.max()
                fields = [(hi - lo) / div, np.float32(max_abs_finite(fin))]
        return all(bool(np.isfinite(np.asarray(f).astype(np.float16)).all()) for f in fields)


def fits_type(a: np.ndarray, qtype: QTypeLike) -> bool:
    """True if storing ``a`` as ``qtype`` keeps every finite value finite.

    Exact for F32/F16/BF16 and Q8_0/Q4_0/Q5_0 (any shape: a 1-element array holding max|x| gives the same
    answer as the tensor), exact per block for Q4_1/Q5_1 with 32-divisible rows; for K-quants and IQ4_NL a
    conservative max|x| bound (their scales come from an iterative fit). Other types are held to the F16 limit.
    """
    t = as_ggml(qtype)
    if t == GT.F32:
        return True
    if t == GT.F16:
        return fits_f16(a)
    if t == GT.BF16:
        a = np.asarray(a, dtype=np.float32)
        fin = np.isfinite(a)
        return bool(np.isfinite(bf16_to_f32(f32_to_bf16(a[fin]))).all())
    if t in _LEGACY:
        return _legacy_scales_fit(a, t)
    return max_abs_finite(a) <= _ITERATIVE_AMAX_LIMIT.get(t, F16_MAX)


# --------------------------------------------------------------------------------------------- quantize


def quantize(a: np.ndarray, qtype: QTypeLike, *, strict: bool = True) -> np.ndarray:
    """Encode a float array (numpy shape, last axis = row) as GGUF bytes of ``qtype``.

    Returns uint8 of shape ``(*a.shape[:-1], row_bytes)``. With ``strict`` a ``QuantRangeError`` is raised when
    finite inputs would overflow the type (use ``policy.range_safe`` first to pick a type that fits).
    Raises ValueError when the row length is not a multiple of the block size (docs/model.md §11) and
    NotImplementedError for K-quants / IQ4_NL (``quant.kernels.encode`` makes those with ggml's C quantizer).
    """
    t = as_ggml(qtype)
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.shape[-1] % block_size(t) != 0:
        raise ValueError(f"row length {a.shape[-1]} is not a multiple of the {t.name} block size {block_size(t)}")
    if strict and not fits_type(a, t):
        raise QuantRangeError(f"values up to |x|={max_abs_finite(a):.6g} overflow {t.name}")
    out_shape = (*a.shape[:-1], row_nbytes(t, a.shape[-1]))
    if t == GT.F32:
        raw = np.ascontiguousarray(a).view(np.uint8)
    elif t == GT.F16:
        with np.errstate(over="ignore"):
            raw = np.ascontiguousarray(a.astype(np.float16)).view(np.uint8)
    elif t == GT.BF16:
        raw = f32_to_bf16(a).view(np.uint8)
    elif t in _LEGACY:
        with np.errstate(over="ignore"):
            raw = gq.quantize(a, t)
        if t != GT.Q8_0:
            _fix_zero_signs(a, raw, t)
    else:
        raise NotImplementedError(f"no numpy quantizer for {t.name}; use quant.kernels.encode (ggml's own)")
    return raw.reshape(out_shape)


def _fix_zero_signs(a: np.ndarray, raw: np.ndarray, t: GT) -> None:
    """Make signed zeros in the F16 block fields match ggml's scalar reference loops (ggml-quants.c).

    Q4_0/Q5_0: ggml's signed max starts at +0.0, so an all-zero block gets d = +0.0/-k = -0.0 (0x8000), whereas
    gguf-py takes the first element's signed zero. Q4_1/Q5_1: ggml's min is the first zero met when the block
    minimum is 0 (numpy's min may pick either sign), and an all-zero block gets d = z - z = +0.0.
    Only the zero sign differs; decoded values are the same either way.
    """
    blocks = raw.reshape(-1, type_size(t))
    x = a.reshape(-1, block_size(t))
    if t in (GT.Q4_0, GT.Q5_0):
        zero = np.abs(x).max(axis=1) == 0
        blocks[zero, 0:2] = (0x00, 0x80)
        return
    lo_zero = x.min(axis=1) == 0
    if lo_zero.any():
        xz = x[lo_zero]
        first = np.argmax(xz == 0, axis=1)
        neg = np.signbit(xz[np.arange(xz.shape[0]), first])
        blocks[lo_zero, 2] = 0x00
        blocks[lo_zero, 3] = np.where(neg, 0x80, 0x00)
    all_zero = lo_zero & (x.max(axis=1) == 0)
    blocks[all_zero, 0:2] = (0x00, 0x00)


# --------------------------------------------------------------------------------------------- dequantize


def _as_byte_rows(raw: np.ndarray | bytes, t: GT, ne0: int) -> np.ndarray:
    """View raw tensor data as (n_rows, row_bytes) uint8."""
    flat = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else \
        np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    rb = row_nbytes(t, ne0)
    if flat.size % rb != 0:
        raise ValueError(f"{flat.size} bytes is not a whole number of {t.name} rows of {ne0} ({rb} B each)")
    return flat.reshape(-1, rb)


# Elements and bytes per block of the two block types decoded here; float16 -> float32 of every half, by its bits.
_QK8_0, _QK4_0 = block_size(GT.Q8_0), block_size(GT.Q4_0)
_Q8_0_BYTES, _Q4_0_BYTES = type_size(GT.Q8_0), type_size(GT.Q4_0)
_F16_TO_F32 = np.arange(1 << 16).astype(np.uint16).view(np.float16).astype(np.float32)


def _f32_into(raw: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, raw.view(np.float32))


def _f16_into(raw: np.ndarray, out: np.ndarray) -> None:
    """A table look-up: 2.6x faster than numpy's half -> float cast, and the same bits."""
    np.take(_F16_TO_F32, raw.view(np.uint16), out=out, mode="wrap")


def _bf16_into(raw: np.ndarray, out: np.ndarray) -> None:
    """A bf16 value is the top half of the float32 with the same bits."""
    np.left_shift(raw.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


def _q8_0_into(raw: np.ndarray, out: np.ndarray) -> None:
    """block_q8_0 = {f16 d; int8 qs[32]}; x = qs * d (ggml-common.h)."""
    blk = raw.reshape(-1, _Q8_0_BYTES)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)
    np.multiply(blk[:, 2:].view(np.int8), d, out=out.reshape(-1, _QK8_0))


def _q4_0_into(raw: np.ndarray, out: np.ndarray) -> None:
    """block_q4_0 = {f16 d; u8 qs[16]}; element j = ((qs[j] & 15) - 8) * d, element j+16 = ((qs[j] >> 4) - 8) * d."""
    blk = raw.reshape(-1, _Q4_0_BYTES)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blk[:, 2:]
    o = out.reshape(-1, 2, _QK4_0 // 2)
    np.bitwise_and(qs, np.uint8(0x0F), out=o[:, 0], casting="unsafe")
    np.right_shift(qs, np.uint8(4), out=o[:, 1], casting="unsafe")
    o -= np.float32(8)
    o *= d[:, :, None]


# Types decoded here straight into a float32 buffer: flat uint8 data of whole blocks -> flat float32 ``out``.
_GT_BY_NAME = dict(GT.__members__)  # "Q8_0" -> GT.Q8_0: the names readers pass, without as_ggml's normalising
_INTO = {GT.F32: _f32_into, GT.F16: _f16_into, GT.BF16: _bf16_into, GT.Q8_0: _q8_0_into, GT.Q4_0: _q4_0_into}


def _dequant_byte_rows(rows: np.ndarray, t: GT) -> np.ndarray:
    """(n, row_bytes) uint8 -> (n, ne0) float32 (inf scales decode to inf/NaN without numpy warnings)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if t in _INTO:
            ne0 = rows.shape[1] // type_size(t) * block_size(t)
            out = np.empty(rows.shape[0] * ne0, np.float32)
            _INTO[t](np.ascontiguousarray(rows).reshape(-1), out)
            return out.reshape(rows.shape[0], ne0)
        return np.asarray(gq.dequantize(rows, t), dtype=np.float32)


def dequantize(raw: np.ndarray | bytes, qtype: QTypeLike, shape: Sequence[int]) -> np.ndarray:
    """Decode GGUF data of ``qtype`` into float32 of numpy ``shape`` (last axis = row)."""
    shape = tuple(int(s) for s in shape) or (1,)
    return dequantize_rows(raw, qtype, shape).reshape(shape)


def dequantize_rows(raw: np.ndarray | bytes, qtype: QTypeLike, shape: Sequence[int],
                    rows: slice | int | Sequence[int] | np.ndarray = slice(None)) -> np.ndarray:
    """Decode only some rows of a tensor (rows index the flattened leading axes of numpy ``shape``).

    Returns float32 ``(k, shape[-1])`` (``(shape[-1],)`` for an int ``rows``). Only the selected rows' blocks are
    touched, so a memory-mapped tensor is read lazily (e.g. embedding lookups, one expert of a stacked tensor).
    """
    t = as_ggml(qtype)
    shape = tuple(int(s) for s in shape) or (1,)
    byte_rows = _as_byte_rows(raw, t, shape[-1])
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if byte_rows.shape[0] != n_rows:
        raise ValueError(f"data holds {byte_rows.shape[0]} rows, shape {shape} needs {n_rows}")
    if isinstance(rows, (int, np.integer)):
        return _dequant_byte_rows(byte_rows[int(rows)][None, :], t)[0]
    if not isinstance(rows, slice):
        rows = np.asarray(rows, dtype=np.int64)
    return _dequant_byte_rows(np.ascontiguousarray(byte_rows[rows]), t)


def dequantize_rows_into(out: np.ndarray, raw: np.ndarray | bytes, qtype: QTypeLike, shape: tuple[int, int],
                         a: int, b: int) -> None:
    """Decode rows [a, b) of a [rows, ne0] tensor into ``out``, a preallocated C-contiguous float32 array of
    (b - a) * ne0 elements (e.g. a slice of a flat weight buffer), bit for bit as ``dequantize_rows``.

    F32/F16/BF16/Q8_0/Q4_0 are decoded in one pass straight into ``out`` (no temporary the size of the rows: the
    vision encoder decodes every weight of every layer this way, per image, in cache-sized steps, so the per-call
    overhead is kept to a few table look-ups); other types through gguf-py. Unlike ``dequantize_rows`` this does
    not silence numpy's warning for an infinite block scale.
    """
    t = qtype if isinstance(qtype, GT) else _GT_BY_NAME.get(qtype) if isinstance(qtype, str) else None
    if t is None:
        t = as_ggml(qtype)
    rows, ne0 = shape
    bs, ts = GGML_QUANT_SIZES[t]
    if ne0 % bs:
        raise ValueError(f"row length {ne0} is not a multiple of the {t.name} block size {bs}")
    if (not 0 <= a <= b <= rows or out.size != (b - a) * ne0 or out.dtype != np.float32
            or not out.flags.c_contiguous):
        raise ValueError(f"rows [{a}, {b}) of {rows} x {ne0} do not fit a C-contiguous float32 buffer of {out.size}")
    rb = ne0 // bs * ts
    flat = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else \
        np.asarray(raw).reshape(-1).view(np.uint8)
    if flat.size != rows * rb:
        raise ValueError(f"{flat.size} bytes, a [{rows}, {ne0}] {t.name} tensor has {rows * rb}")
    flat_out = out if out.ndim == 1 else out.reshape(-1)
    into = _INTO.get(t)
    if into is not None:  # (an empty range too)
        into(flat[a * rb:b * rb], flat_out)
    elif b > a:
        flat_out[:] = _dequant_byte_rows(flat[a * rb:b * rb].reshape(b - a, rb), t).reshape(-1)
