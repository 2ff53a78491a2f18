"""GGUF tensor formats and numbers: types, numpy codec, per-tensor type policy, error metrics (docs/model.md §11).

Knows nothing about Kimi-VL beyond GGUF tensor names. ``ggml_c`` (ctypes over llama.cpp's libggml-base) and
``kernels`` (the converter's encoder on top of it) are not imported here, so importing ``quant`` loads no C library.
"""
from .codec import (
    F16_MAX,
    F16_OVERFLOW,
    QuantRangeError,
    bf16_to_f32,
    dequantize,
    dequantize_rows,
    dequantize_rows_into,
    f32_to_bf16,
    fits_f16,
    fits_type,
    quantize,
)
from .metrics import cosine, cosine_rows, kl_divergence, max_rel_err, mean_kl, nmse, top1_agreement
from .policy import fallback, mmproj_tensor_type, range_fallback, text_plan, text_tensor_type
from .types import FType, QType, as_ftype, as_qtype, bits_per_weight, block_size, nbytes, row_nbytes, type_size

__all__ = [
    "F16_MAX", "F16_OVERFLOW", "QuantRangeError", "bf16_to_f32", "dequantize", "dequantize_rows",
    "dequantize_rows_into", "f32_to_bf16", "fits_f16", "fits_type", "quantize",
    "cosine", "cosine_rows", "kl_divergence", "max_rel_err", "mean_kl", "nmse", "top1_agreement",
    "fallback", "mmproj_tensor_type", "range_fallback", "text_plan", "text_tensor_type",
    "FType", "QType", "as_ftype", "as_qtype", "bits_per_weight", "block_size", "nbytes", "row_nbytes", "type_size",
]
