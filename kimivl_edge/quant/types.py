"""Tensor and file types the converter can emit, as a thin layer over ``gguf.GGMLQuantizationType``.

Block sizes and bytes per block come from gguf-py's ``GGML_QUANT_SIZES`` (the same table as ggml's type traits);
the constraint "ne0 must be a multiple of the block size" is docs/model.md §11.

Shapes: ``shape`` is numpy order (last axis = the contiguous row, i.e. ggml ``ne0``); ``ne`` is ggml order
(``ne[0]`` first). ``ne == tuple(reversed(shape))``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

__all__ = [
    "QType",
    "FType",
    "QTypeLike",
    "FTypeLike",
    "as_qtype",
    "as_ggml",
    "as_ftype",
    "block_size",
    "type_size",
    "bits_per_weight",
    "row_nbytes",
    "nbytes",
]


class QType(Enum):
    """Per-tensor storage types our tools name (value = the ggml type name)."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    IQ4_NL = "IQ4_NL"
    Q2_K = "Q2_K"
    Q3_K = "Q3_K"
    Q4_K = "Q4_K"
    Q5_K = "Q5_K"
    Q6_K = "Q6_K"
    IQ4_XS = "IQ4_XS"
    IQ3_S = "IQ3_S"
    IQ3_XXS = "IQ3_XXS"
    IQ2_S = "IQ2_S"
    IQ2_XXS = "IQ2_XXS"

    @property
    def ggml(self) -> GGMLQuantizationType:
        """The gguf-py / ggml enum member (its ``.value`` is the ggml_type number)."""
        return GGMLQuantizationType[self.value]

    @property
    def block_size(self) -> int:
        """Elements per block (1 for F32/F16/BF16, 32 for legacy quants and IQ4_NL, 256 for K-quants)."""
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per element, scales included (e.g. Q8_0: 34 B / 32 = 8.5)."""
        return 8.0 * self.type_size / self.block_size

    @property
    def is_float(self) -> bool:
        """True for the element types F32 / F16 / BF16 (no blocks, no scales)."""
        return self.block_size == 1

    @property
    def is_kquant(self) -> bool:
        """True for the 256-element super-block K-quants."""
        return self in (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)


class FType(Enum):
    """Whole-file recipes: element/legacy types, llama.cpp's K-quant and IQ mixes, and our recipes over one of them
    (``base``): the shape-aware Q4_K_EDGE (llama.cpp's Q4_K_M except where a K-quant does not fit a row) and IQ4_EDGE
    (IQ4_XS routed experts, every other weight at more bits), see ``quant.policy``. The IQ mixes are made for use
    with an importance matrix (``convert --imatrix``); IQ3_XXS and IQ2_XXS require one."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    Q4_K_M = "Q4_K_M"
    Q5_K_M = "Q5_K_M"
    Q6_K = "Q6_K"
    Q4_K_EDGE = "Q4_K_EDGE"
    IQ4_EDGE = "IQ4_EDGE"
    IQ4_XS = "IQ4_XS"
    IQ4_NL = "IQ4_NL"
    IQ3_S = "IQ3_S"
    IQ3_XXS = "IQ3_XXS"
    IQ2_XXS = "IQ2_XXS"

    @property
    def base(self) -> FType:
        """The llama.cpp mix an own recipe refines (its per-tensor rules before ours); itself for the others."""
        return _RECIPE_BASE.get(self, self)

    @property
    def llama_ftype(self) -> int:
        """``enum llama_ftype`` number (as in gguf ``LlamaFileType`` / ``general.file_type``); our recipes have
        none of their own and are written as their ``base`` (Q4_K_EDGE as MOSTLY_Q4_K_M)."""
        name = "ALL_F32" if self is FType.F32 else f"MOSTLY_{self.base.value}"
        return int(LlamaFileType[name])

    @property
    def default_qtype(self) -> QType:
        """The type llama.cpp's ``llama_ftype_get_default_type`` gives this recipe (before per-tensor rules)."""
        return _FTYPE_DEFAULT[self]

    @property
    def is_kquant_mix(self) -> bool:
        """True for the mixes whose per-tensor types follow llama.cpp's ``llama_tensor_get_type`` rules."""
        return self in (FType.Q4_K_M, FType.Q5_K_M, FType.Q6_K, FType.Q4_K_EDGE, FType.IQ4_EDGE) or self.is_iq_mix

    @property
    def is_iq_mix(self) -> bool:
        """True for llama.cpp's IQ mixes (their per-tensor types also follow ``llama_tensor_get_type``)."""
        return self.name.startswith("IQ") and self.base is self

    @property
    def requires_imatrix(self) -> bool:
        """True if llama.cpp refuses this mix without an importance matrix (``tensor_requires_imatrix``)."""
        return self in (FType.IQ3_XXS, FType.IQ2_XXS)


_FTYPE_DEFAULT = {
    FType.F32: QType.F32,
    FType.F16: QType.F16,
    FType.BF16: QType.BF16,
    FType.Q8_0: QType.Q8_0,
    FType.Q4_0: QType.Q4_0,
    FType.Q4_K_M: QType.Q4_K,
    FType.Q4_K_EDGE: QType.Q4_K,
    FType.IQ4_EDGE: QType.IQ4_XS,
    FType.Q5_K_M: QType.Q5_K,
    FType.Q6_K: QType.Q6_K,
    FType.IQ4_XS: QType.IQ4_XS,
    FType.IQ4_NL: QType.IQ4_NL,
    FType.IQ3_S: QType.IQ3_S,
    FType.IQ3_XXS: QType.IQ3_XXS,
    FType.IQ2_XXS: QType.IQ2_XXS,
}

_RECIPE_BASE = {FType.Q4_K_EDGE: FType.Q4_K_M, FType.IQ4_EDGE: FType.IQ4_XS}

QTypeLike = QType | GGMLQuantizationType | str
FTypeLike = FType | str


def as_qtype(t: QTypeLike) -> QType:
    """Normalise a type given as QType, gguf enum or (case-insensitive) name to QType."""
    if isinstance(t, QType):
        return t
    if isinstance(t, GGMLQuantizationType):
        t = t.name
    if isinstance(t, str):
        try:
            return QType(t.upper())
        except ValueError:
            pass
    raise ValueError(f"unsupported tensor type {t!r}; expected one of {', '.join(q.value for q in QType)}")


def as_ggml(t: QTypeLike) -> GGMLQuantizationType:
    """Normalise to the gguf enum; unlike ``as_qtype`` this accepts every type gguf-py knows (for reading)."""
    if isinstance(t, GGMLQuantizationType):
        return t
    if isinstance(t, QType):
        return t.ggml
    try:
        return GGMLQuantizationType[str(t).upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {t!r}") from None


def as_ftype(f: FTypeLike) -> FType:
    """Normalise a file type given as FType or (case-insensitive) name, e.g. ``"q4_k_m"``."""
    if isinstance(f, FType):
        return f
    try:
        return FType(str(f).upper())
    except ValueError:
        raise ValueError(f"unsupported file type {f!r}; expected one of {', '.join(x.value for x in FType)}") from None


def block_size(t: QTypeLike) -> int:
    """Elements per block of any gguf-known type."""
    return GGML_QUANT_SIZES[as_ggml(t)][0]


def type_size(t: QTypeLike) -> int:
    """Bytes per block of any gguf-known type."""
    return GGML_QUANT_SIZES[as_ggml(t)][1]


def bits_per_weight(t: QTypeLike) -> float:
    """Storage bits per element (scales included)."""
    return 8.0 * type_size(t) / block_size(t)


def row_nbytes(t: QTypeLike, ne0: int) -> int:
    """Bytes of one row of ``ne0`` elements; ne0 must be a multiple of the block size (docs/model.md §11)."""
    bs = block_size(t)
    if ne0 % bs != 0:
        raise ValueError(f"row length {ne0} is not a multiple of the {as_ggml(t).name} block size {bs}")
    return ne0 // bs * type_size(t)


def nbytes(t: QTypeLike, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy ``shape`` (last axis = row) stored as ``t``."""
    if len(shape) == 0:
        return row_nbytes(t, 1)
    return math.prod(shape[:-1]) * row_nbytes(t, int(shape[-1]))
