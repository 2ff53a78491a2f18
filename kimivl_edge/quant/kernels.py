"""The converter's encoder: float32 rows -> GGUF bytes, as fast as this machine allows and still exact.

``encode(rows, qtype)`` gives the bytes ggml itself would write:

* F32 / F16 / BF16: numpy casts (``codec.quantize``);
* quantized types: ggml's own ``ggml_quantize_chunk`` through ctypes (``ggml_c``), the same C code
  ``llama_model_quantize`` runs, so K-quants and IQ4_NL need no intermediate file; for Q8_0 / Q4_0 it is
  byte-identical to our numpy codec (tests/test_quant.py) and 3-8x faster. Without the library, numpy (Q8_0 /
  Q4_0 / Q4_1 / Q5_0 / Q5_1 only).

ctypes drops the GIL during the C call and numpy during its large loops, so several threads encode in parallel
(``convert.gguf_out`` runs a pool). Every call checks that no finite value overflows the type
(``codec.QuantRangeError``), so a caller can fall back to a wider type for that tensor: for Q8_0 / Q4_0 / Q5_0 from
the F16 block scales ggml wrote (no extra pass over the input unless one is near the limit), else from max|x|.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as GT

from . import codec
from .types import QTypeLike, as_ggml, type_size

__all__ = ["encode", "c_quantizer_available"]

_FLOATS = (GT.F32, GT.F16, GT.BF16)
_ONE_NUMBER = (GT.F16, GT.BF16, GT.Q8_0, GT.Q4_0, GT.Q5_0, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.IQ4_NL)  # fits_type on max|x|


@lru_cache(maxsize=1)
def c_quantizer_available() -> bool:
    from . import ggml_c

    return ggml_c.available()


def _fits(rows: np.ndarray, t: GT) -> bool:
    if t == GT.F32:
        return True
    if t in _ONE_NUMBER:  # decided by max|x| alone (codec.fits_type's documented exactness)
        return codec.fits_type(np.array([codec.max_abs_finite(rows)], np.float32), t)
    return codec.fits_type(rows, t)


# Legacy types whose every block starts with its F16 scale d (ggml's block_q8_0 / block_q4_0 / block_q5_0).
_D_FIRST = {t: type_size(t) for t in (GT.Q8_0, GT.Q4_0, GT.Q5_0)}  # -> block bytes


def _scales_below_f16_max(raw: np.ndarray, block_bytes: int) -> bool:
    """True if every block's F16 scale has |d| < 65504: then no finite input overflowed (d comes from the block's
    max|x|, so a finite d below the F16 maximum means the block's finite values fit), found without another pass
    over the float32 input."""
    d = raw.reshape(-1, block_bytes)[:, :2].copy().view(np.float16)
    return bool((np.abs(d) < np.float16(65504)).all())


def encode(rows: np.ndarray, qtype: QTypeLike, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``rows`` float32 [n, ne0] -> uint8 [n, row_bytes]; raises ``codec.QuantRangeError`` on overflow.
    ``imatrix`` (float32 [ne0]): importance weights for every row, given to ggml's quantizer (float types and the
    numpy codec ignore them, as ggml's Q8_0 does)."""
    t = as_ggml(qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if t in _FLOATS:
        imatrix = None
    if t in _D_FIRST and c_quantizer_available():  # quantize first, check the written scales (the usual case)
        from . import ggml_c

        raw = ggml_c.quantize(rows, t, imatrix)
        if _scales_below_f16_max(raw, _D_FIRST[t]) or _fits(rows, t):  # else: the exact check decides
            return raw
        raise codec.QuantRangeError(f"values up to |x|={codec.max_abs_finite(rows):.6g} overflow {t.name}")
    if not _fits(rows, t):
        raise codec.QuantRangeError(f"values up to |x|={codec.max_abs_finite(rows):.6g} overflow {t.name}")
    if t in _FLOATS or not c_quantizer_available():
        return codec.quantize(rows, t, strict=False)
    from . import ggml_c

    return ggml_c.quantize(rows, t, imatrix)
