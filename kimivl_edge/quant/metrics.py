"""Error metrics for comparing a quantized/approximate result with a reference (all numpy, float64 math).

Conventions: ``test`` is the value under evaluation, ``ref`` the reference; per-row metrics reduce over the last
axis. Logit metrics treat the last axis as the vocabulary.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "cosine_rows",
    "cosine",
    "nmse",
    "max_rel_err",
    "log_softmax",
    "kl_divergence",
    "mean_kl",
    "top1_agreement",
]


def _pair(test: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(test, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return a, b


def cosine_rows(test: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (last axis). Two all-zero rows count as 1.0, one all-zero row as 0.0."""
    a, b = _pair(test, ref)
    na = np.sqrt((a * a).sum(axis=-1))
    nb = np.sqrt((b * b).sum(axis=-1))
    dot = (a * b).sum(axis=-1)
    denom = na * nb
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return cos


def cosine(test: np.ndarray, ref: np.ndarray) -> float:
    """Cosine similarity of the two arrays flattened."""
    a, b = _pair(test, ref)
    return float(cosine_rows(a.reshape(1, -1), b.reshape(1, -1))[0])


def nmse(test: np.ndarray, ref: np.ndarray) -> float:
    """Normalised mean squared error sum((test-ref)^2) / sum(ref^2) (0 if both are all zero, inf if only ref is)."""
    a, b = _pair(test, ref)
    err = float(((a - b) ** 2).sum())
    den = float((b * b).sum())
    if den == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / den


def max_rel_err(test: np.ndarray, ref: np.ndarray) -> float:
    """max|test-ref| / max|ref| (0 if both are all zero, inf if only ref is)."""
    a, b = _pair(test, ref)
    err = float(np.abs(a - b).max(initial=0.0))
    den = float(np.abs(b).max(initial=0.0))
    if den == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / den


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(test_logits: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
    """Per-row KL(P_ref || P_test) in nats, P = softmax(logits) over the last axis (float64)."""
    lq, lp = (log_softmax(x) for x in _pair(test_logits, ref_logits))
    p = np.exp(lp)
    return (p * (lp - lq)).sum(axis=-1)


def mean_kl(test_logits: np.ndarray, ref_logits: np.ndarray) -> float:
    """KL(P_ref || P_test) averaged over rows."""
    return float(np.mean(kl_divergence(test_logits, ref_logits)))


def top1_agreement(test_logits: np.ndarray, ref_logits: np.ndarray) -> float:
    """Fraction of rows whose argmax (over the last axis) agrees."""
    a, b = _pair(test_logits, ref_logits)
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))
