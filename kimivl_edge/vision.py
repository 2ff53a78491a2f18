"""Numpy MoonViT + 2x2 merge + projector on an mmproj GGUF (docs/model.md §5, §6): the runtime's vision encoder.

    enc = VisionEncoder("mmproj-Kimi-VL-A3B-Instruct-Q8_0.gguf")
    pixel_values, grid_hws = preprocess(images, enc.mmproj.image_processor_config())
    embeds = enc.encode(pixel_values, grid_hws)      # one [gh*gw/4, projection_dim] float32 array per image

Everything is float32 on BLAS matmuls; quantized weights (F16, BF16, Q8_0, Q4_0) are decoded to float32 in
cache-sized row steps, either for each layer while the previous one runs (default: two layers' buffers, reused) or
once and kept (``weight_cache=True``). Both paths run the same matmuls, so their outputs are equal.

Parallelism: a pool of ``threads`` workers; OpenBLAS is set to one thread for the duration of an encode (and set
back after: ``kimivl_edge.threads``), so the pool is the only source of threads and BLAS never nests inside it.
Row-wise work runs in chunks of patches; attention runs per image (block-diagonal, never a global mask: reference
doc §5.3, §10.1), per head and per query block whose [rows, n] score block stays under ``max_score_bytes`` (4 MiB
by default: one block per worker stays in the L3 cache; it measured faster than L2-sized blocks, whose matmuls are
less efficient): the row max, exp and row sum of the softmax run in place on that block while it is in cache.
RoPE follows the Q/K row layout the file declares (``MmprojFile.hparams.rope_layout``; docs/model.md §5.4).
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

from .config import ROPE_MAX_GRID
from .errors import UsageError
from .mmproj import MmprojFile
from .quant.codec import dequantize_rows_into
from .threads import single_threaded_blas, worker_pool

__all__ = [
    "VisionEncoder", "bicubic_matrix", "resample_pos_emb", "rope_angles", "apply_rope", "erf", "gelu_erf",
    "gelu_tanh", "layer_norm", "query_block_rows", "attention_items", "attend", "ScoreScratch", "merge_2x2",
    "row_chunks", "check_patches", "decode_rows_into", "Progress",
]

BICUBIC_A = -0.75           # PyTorch's bicubic coefficient (docs/model.md §5.2)
ROPE_THETA = 10000.0        # MoonViT's 2-D RoPE base (docs/model.md §5.4; llama.cpp hard-codes it too)
PROJECTOR_LN_EPS = 1e-5     # nn.LayerNorm default of the projector's pre_norm (docs/model.md §6)
DEFAULT_SCORE_BYTES = 4 << 20  # one attention score block per worker (256 query rows of a 4096-patch image)
ROW_CHUNK = 512             # patches per row-wise work item (bounds the [rows, intermediate] MLP activation)
MIN_PARTS, MIN_ROWS = 4, 64  # row-wise work of small images: up to 4 items of >= 64 rows (BLAS stays efficient)

Progress = Callable[[int, int, str], None]
"""``progress(done, total, unit)``: ``done`` of the ``total`` units of one ``encode`` call have finished; ``unit``
names what is counted. The same for both backends: the numpy one reports "layer" (every image runs through each
layer at once), llama.cpp's clip reports "image" (it runs one image through all layers per call)."""


# ---------------------------------------------------------------------------------------------------------------
# §5.2 position embedding: exact PyTorch bicubic (align_corners=False, A = -0.75) as two matrices

def _cubic(d: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
    """Keys' cubic kernel K(d) (docs/model.md §5.2)."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 1-D resampling matrix; clamped taps add up (docs/model.md §5.2). Read-only, cached."""
    i = np.arange(n_out, dtype=np.float64)
    u = (i + 0.5) * (n_in / n_out) - 0.5  # not clamped
    u0 = np.floor(u)
    t = u - u0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for offset, dist in ((-1, 1 + t), (0, t), (1, 1 - t), (2, 2 - t)):
        taps = np.clip(u0 + offset, 0, n_in - 1).astype(np.int64)
        np.add.at(m, (rows, taps), _cubic(dist))
    m.setflags(write=False)
    return m


def resample_pos_emb(table: np.ndarray, h: int, w: int) -> np.ndarray:
    """Table [H, W, C] (axis 0 = row) -> [h*w, C] float32, row-major: out[:, :, c] = M_h·T[:, :, c]·M_wᵀ (§5.2).

    Computed in float64 like the reference, then rounded to float32.
    """
    h0, w0, c = table.shape
    m_h, m_w = bicubic_matrix(h0, h), bicubic_matrix(w0, w)
    rows = (m_h @ table.reshape(h0, w0 * c).astype(np.float64)).reshape(h, w0, c)   # [h, W, C]
    out = np.matmul(m_w[None], rows)                                                 # [h, w, C]
    return out.reshape(h * w, c).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# §5.4 2-D RoPE

def rope_angles(h: int, w: int, head_dim: int, layout: str, theta: float = ROPE_THETA) -> np.ndarray:
    """Angle of each adjacent pair (2k, 2k+1) of a head, [h*w, head_dim/2] float64, patches row-major (§5.4).

    f_i = theta^(-4i/head_dim), i < head_dim/4; c = column, r = row of the patch in its image.
    - "hf_interleaved" (checkpoint order): pair 2i turns by c·f_i, pair 2i+1 by r·f_i.
    - "ggml_split" (Q/K rows permuted by the converter): pairs 0..n/4-1 turn by c·f_i, the next n/4 by r·f_i
      (ggml's rope on each half, n_dims = head_dim/2, base^(-2i/n_dims) = f_i).
    """
    q = head_dim // 4
    f = theta ** (-4.0 * np.arange(q, dtype=np.float64) / head_dim)
    r = np.repeat(np.arange(h, dtype=np.float64), w)[:, None] * f   # [n, q]
    c = np.tile(np.arange(w, dtype=np.float64), h)[:, None] * f
    if layout == "hf_interleaved":
        return np.stack([c, r], axis=-1).reshape(h * w, 2 * q)
    if layout == "ggml_split":
        return np.concatenate([c, r], axis=-1)
    raise ValueError(f"unknown RoPE layout {layout!r}")


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """In place: rotate adjacent pairs (a, b) of x [n, heads, d] -> (a cos - b sin, a sin + b cos); cos/sin
    [n, d/2] (docs/model.md §5.4)."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    a_new = a * c - b * s
    b *= c
    b += a * s
    a[...] = a_new


# ---------------------------------------------------------------------------------------------------------------
# elementwise pieces

def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance), float32, new array."""
    mean = x.mean(-1, keepdims=True, dtype=np.float32)
    y = x - mean
    var = np.mean(y * y, axis=-1, keepdims=True, dtype=np.float32)
    y *= 1.0 / np.sqrt(var + np.float32(eps))
    y *= weight
    y += bias
    return y


_GELU_C1 = -2.0 * math.sqrt(2.0 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """In place 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715x³))): the vision MLP activation (docs/model.md §5.3).

    Evaluated as x / (1 + exp(-2u)), u = √(2/π)·(x + 0.044715x³): the same function, as
    1 + tanh u = 2 / (1 + e^{-2u}), in seven passes; exp overflows to inf for very negative x, giving -0.0 like the
    tanh form.
    """
    t = x * x
    t *= np.float32(_GELU_C3)
    t += np.float32(_GELU_C1)
    t *= x
    with np.errstate(over="ignore"):
        np.exp(t, out=t)
    t += np.float32(1.0)
    x /= t
    return x


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t·(a1 + t(a2 + t(a3 + t(a4 + t·a5))))·exp(-z²), t = 1/(1 + p·z), z >= 0;
# |error| <= 1.5e-7 for all z.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf, float64 arithmetic, absolute error <= 1.5e-7 (A&S 7.1.26); returns x's float dtype."""
    z = np.abs(np.asarray(x, dtype=np.float64))
    t = 1.0 / (1.0 + _ERF_P * z)
    poly = np.full_like(z, _ERF_A[4])
    for a in _ERF_A[3::-1]:
        poly *= t
        poly += a
    poly *= t
    z *= z
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z
    np.subtract(1.0, poly, out=poly)
    np.copysign(poly, x, out=poly)
    return poly.astype(np.result_type(np.asarray(x).dtype, np.float32), copy=False)


ERF_CHUNK = 1 << 15  # elements per float64 pass of gelu_erf (stays in cache)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """In place exact GELU 0.5·x·(1 + erf(x/√2)) on a float32 array: the projector activation (docs/model.md §6).

    erf is evaluated in float64 (``erf``, |error| <= 1.5e-7) over cache-sized chunks of the flattened array.
    """
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("gelu_erf works in place on a C-contiguous float32 array")
    flat = x.reshape(-1)
    for s in range(0, flat.size, ERF_CHUNK):
        part = flat[s:s + ERF_CHUNK]
        z = part.astype(np.float64)
        part *= np.float32(0.5)
        z *= 1.0 / math.sqrt(2.0)
        e = erf(z)
        e += 1.0
        part *= e
    return x


def merge_2x2(x: np.ndarray, gh: int, gw: int, m: int = 2) -> np.ndarray:
    """[gh*gw, C] row-major -> [(gh/m)(gw/m), m*m*C]: token (a, b) = patches TL, TR, BL, BR of its cell (§5.5, §6)."""
    c = x.shape[-1]
    y = x.reshape(gh // m, m, gw // m, m, c).transpose(0, 2, 1, 3, 4)
    return y.reshape((gh // m) * (gw // m), m * m * c)


# ---------------------------------------------------------------------------------------------------------------
# row-wise work items

def row_chunks(n_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """Near-equal [a, b) ranges covering ``n_rows``: at most ``max_rows`` rows each, and at least ``MIN_PARTS`` of
    them while each keeps ``MIN_ROWS`` rows (so small images still feed several workers). They do not depend on the
    number of threads, so neither does the result."""
    k = max(-(-n_rows // max_rows), min(MIN_PARTS, n_rows // MIN_ROWS), 1)
    cuts = np.linspace(0, n_rows, k + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


# ---------------------------------------------------------------------------------------------------------------
# §5.3 attention, per image and head, in query blocks whose scores stay in cache

def query_block_rows(n: int, max_score_bytes: int) -> int:
    """Query rows per block so one head's [rows, n] float32 score block fits ``max_score_bytes`` (at least 1)."""
    return max(1, min(n, max_score_bytes // (4 * n)))


def attention_items(grids: Sequence[tuple[int, int]], heads: int, max_score_bytes: int
                    ) -> list[tuple[int, int, int, int, int]]:
    """(image start, image patches, head, row0, row1) blocks covering every image (block-diagonal, §5.3): the
    query rows [row0, row1) of one head of one image against all of that image's keys. Largest first."""
    items, start = [], 0
    for gh, gw in grids:
        n = gh * gw
        b = query_block_rows(n, max_score_bytes)
        items += [(start, n, h, r, min(r + b, n)) for h in range(heads) for r in range(0, n, b)]
        start += n
    return sorted(items, key=lambda it: -(it[4] - it[3]) * it[1])


class ScoreScratch(threading.local):
    """One attention score buffer per worker thread, grown on demand (``attend``'s scratch space)."""
    buf = np.empty(0, np.float32)

    def get(self, rows: int, n: int) -> np.ndarray:
        if self.buf.size < rows * n:
            self.buf = np.empty(rows * n, np.float32)
        return self.buf[:rows * n].reshape(rows, n)


def attend(item: tuple[int, int, int, int, int], qh: np.ndarray, kh: np.ndarray, vh: np.ndarray,
           out: np.ndarray, scratch: ScoreScratch) -> None:
    """out[rows, head] = softmax(q kᵀ) v for one ``attention_items`` block; qh, kh, vh [heads, N, d] (q scaled by
    1/√d). Scores live in the worker's scratch buffer: max, exp and sum run on it in place while it is in cache."""
    s0, n, h, r0, r1 = item
    s = scratch.get(r1 - r0, n)
    np.matmul(qh[h, s0 + r0:s0 + r1], kh[h, s0:s0 + n].T, out=s)
    s -= s.max(axis=1, keepdims=True)
    np.exp(s, out=s)
    den = s.sum(axis=1, keepdims=True)
    o = s @ vh[h, s0:s0 + n]
    np.divide(o, den, out=out[s0 + r0:s0 + r1, h])


# ---------------------------------------------------------------------------------------------------------------
# the encoder

def _quiet(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` with numpy's floating-point warnings off (``np.errstate`` holds per thread, so every worker task
    runs under it): corrupt weights overflow to inf/NaN, which the caller reports once from the output (``KimiVL``
    refuses non-finite embeddings) instead of a stream of RuntimeWarnings."""
    with np.errstate(all="ignore"):
        return fn(*args)


LAYER_TENSORS = ("ln1.weight", "ln1.bias", "attn_out.weight", "attn_out.bias", "ln2.weight", "ln2.bias",
                 "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias")
EMBED_TENSORS = ("v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight")
PROJECT_TENSORS = ("v.post_ln.weight", "v.post_ln.bias", "mm.input_norm.weight", "mm.input_norm.bias",
                   "mm.1.weight", "mm.1.bias", "mm.2.weight", "mm.2.bias")
DECODE_ELEMS = 1 << 16   # weight elements decoded per step (stays in cache)

Weights = dict[str, np.ndarray]


def check_patches(pixel_values: np.ndarray, grid_hws: object, p: int, m: int
                  ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Validate ``pixel_values`` [n, 3, p, p] (or [n, 3*p*p]) against an integer ``grid_hws`` [n_images, 2] whose
    sides are multiples of the merge ``m`` within the RoPE table (the model's rule: 1 <= side <= ROPE_MAX_GRID,
    docs/model.md §5.4; the processor's stricter "Exceed pos emb" rule is ``image.grid_hw``'s); returns
    [n, 3*p*p] float32 and the grids. Shared by both vision backends."""
    pv = np.asarray(pixel_values)
    if pv.ndim not in (2, 4) or pv.shape[1:] not in ((3, p, p), (3 * p * p,)):
        raise UsageError(f"pixel_values must be [n, 3, {p}, {p}], got {list(pv.shape)}")
    g = np.asarray(grid_hws)
    if g.size == 0:
        g = np.zeros((0, 2), dtype=np.int64)
    if g.ndim != 2 or g.shape[1] != 2 or not np.issubdtype(g.dtype, np.integer):
        raise UsageError(f"grid_hws must be integer [n_images, 2], got {g.dtype} {list(g.shape)}")
    grids = [(int(h), int(w)) for h, w in g]
    for gh, gw in grids:
        if gh < m or gw < m or gh % m or gw % m or gh > ROPE_MAX_GRID or gw > ROPE_MAX_GRID:
            raise UsageError(f"grid {gh}x{gw}: sides must be multiples of {m} between {m} and {ROPE_MAX_GRID}")
    total = sum(gh * gw for gh, gw in grids)
    if total != pv.shape[0]:
        raise UsageError(f"grid_hws hold {total} patches but pixel_values has {pv.shape[0]}")
    return np.ascontiguousarray(pv.reshape(pv.shape[0], 3 * p * p), dtype=np.float32), grids


def decode_rows_into(out: np.ndarray, raw: np.ndarray, ttype: str, shape: tuple[int, int], a: int, b: int) -> None:
    """Rows [a, b) of a [rows, ne0] GGUF tensor decoded into the flat float32 ``out`` (``quant.codec``: one pass
    for F32, F16, BF16, Q8_0 and Q4_0)."""
    dequantize_rows_into(out, raw, ttype, shape, a, b)


class VisionEncoder:
    """MoonViT + merge + projector on a Kimi-VL mmproj GGUF (docs/model.md §5, §6), numpy float32.

    ``threads``: worker threads (default: all cores), each running BLAS single-threaded, so ``threads`` is the
    number of cores used. Row-wise work (LayerNorm, QKV + RoPE, output projection, MLP, projector) runs in chunks of
    at most ``row_chunk`` patches; attention in (image, head, query block) items whose score block stays under
    ``max_score_bytes`` (so the softmax works in cache). ``weight_cache``: keep every decoded weight (~4 bytes per
    parameter of RAM) instead of decoding each layer while the previous one runs (into two layers' buffers, kept).
    """

    def __init__(self, mmproj: MmprojFile | str | os.PathLike, weight_cache: bool = False,
                 threads: int | None = None, max_score_bytes: int = DEFAULT_SCORE_BYTES,
                 row_chunk: int = ROW_CHUNK):
        self.mmproj = mmproj if isinstance(mmproj, MmprojFile) else MmprojFile(mmproj)
        self.hparams = self.mmproj.hparams
        self.weight_cache = bool(weight_cache)
        self.threads = (os.cpu_count() or 1) if threads is None else threads
        self.max_score_bytes, self.row_chunk = max_score_bytes, row_chunk
        for name, v, low in (("threads", self.threads, 1), ("max_score_bytes", max_score_bytes, 4),
                             ("row_chunk", row_chunk, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {v!r}")
        self._cache: dict[object, Weights] = {}
        self._buffers: dict[object, Weights] = {}
        self._lock = threading.Lock()
        self._scratch = ScoreScratch()

    # -- weights -----------------------------------------------------------------------------------------------
    def _sources(self, part: object) -> dict[str, list[str]]:
        """Destination name -> file tensors (stacked along rows) of one part: "embed", a block index or "project".
        Block Q, K, V are fused into one [3D, D] matrix (docs/model.md §3.4 row order)."""
        if part == "embed":
            return {t: [t] for t in EMBED_TENSORS}
        if part == "project":
            return {t: [t] for t in PROJECT_TENSORS}
        p = f"v.blk.{part}."
        out = {f"qkv.{s}": [p + f"attn_{x}.{s}" for x in "qkv"] for s in ("weight", "bias")}
        return out | {t: [p + t] for t in LAYER_TENSORS}

    def _buffer(self, part: object) -> Weights:
        """Reused decode buffers of the per-layer mode, kept between encodes (their pages are touched once): one
        each for "embed" and "project", two for the blocks (block i decodes into buffer i % 2 while i - 1 runs)."""
        slot = part % 2 if isinstance(part, int) else part
        if slot not in self._buffers:
            self._buffers[slot] = self._empty(part)
        return self._buffers[slot]

    def _empty(self, part: object) -> Weights:
        out = {}
        for key, names in self._sources(part).items():
            shapes = [self.mmproj.tensor(n)[2] for n in names]
            rows = sum(s[0] for s in shapes)
            out[key] = np.empty((rows,) + tuple(shapes[0][1:]), np.float32)
        return out

    def _decode_into(self, dst: np.ndarray, names: list[str]) -> None:
        """Decode ``names`` stacked along rows into ``dst`` in cache-sized row steps."""
        flat, off = dst.reshape(-1), 0
        for name in names:
            raw, ttype, shape = self.mmproj.tensor(name)
            ne0 = shape[-1]
            rows = math.prod(shape) // ne0
            step = max(1, DECODE_ELEMS // ne0)
            for a in range(0, rows, step):
                b = min(a + step, rows)
                decode_rows_into(flat[off + a * ne0:off + b * ne0], raw, ttype, (rows, ne0), a, b)
            off += rows * ne0

    def _submit_decode(self, part: object, pool: ThreadPoolExecutor) -> tuple[Weights, list[Future]]:
        """Start decoding one part in the pool (one task per tensor); nothing to do when it is cached."""
        if part in self._cache:
            return self._cache[part], []
        w = self._empty(part) if self.weight_cache else self._buffer(part)
        futs = [pool.submit(self._decode_into, w[k], names) for k, names in self._sources(part).items()]
        if self.weight_cache:
            self._cache[part] = w
        return w, futs

    @staticmethod
    def _wait(futs: list[Future]) -> None:
        for f in futs:
            f.result()

    # -- checks ------------------------------------------------------------------------------------------------
    def _check_inputs(self, pixel_values: np.ndarray, grid_hws: object) -> tuple[np.ndarray, list[tuple[int, int]]]:
        return check_patches(pixel_values, grid_hws, self.hparams.patch_size, self.hparams.merge_size)

    # -- row-wise stages (one chunk of patches each, run in a worker) --------------------------------------------
    def _embed_rows(self, ab: tuple[int, int], patches: np.ndarray, pos: np.ndarray, w: Weights,
                    x: np.ndarray) -> None:
        """Patch embedding (conv as a matmul, §5.1) plus the resampled position embedding (§5.2)."""
        a, b = ab
        wp = w["v.patch_embd.weight"]
        np.matmul(patches[a:b], wp.reshape(wp.shape[0], -1).T, out=x[a:b])
        x[a:b] += w["v.patch_embd.bias"]
        x[a:b] += pos[a:b]

    def _qkv_rows(self, ab: tuple[int, int], x: np.ndarray, w: Weights, cos: np.ndarray, sin: np.ndarray,
                  qkvh: np.ndarray) -> None:
        """LN, fused QKV projection and RoPE (§5.3, §5.4) of rows [a, b); q scaled by 1/√d; written head-major into
        qkvh [3, heads, N, d]."""
        a, b = ab
        hp = self.hparams
        y = layer_norm(x[a:b], w["ln1.weight"], w["ln1.bias"], hp.layer_norm_eps)
        qkv = y @ w["qkv.weight"].T
        qkv += w["qkv.bias"]
        qkv = qkv.reshape(b - a, 3, hp.num_heads, hp.head_dim)
        apply_rope(qkv[:, 0], cos[a:b], sin[a:b])
        apply_rope(qkv[:, 1], cos[a:b], sin[a:b])
        qkv[:, 0] *= np.float32(1.0 / math.sqrt(hp.head_dim))
        qkvh[:, :, a:b] = qkv.transpose(1, 2, 0, 3)

    def _mlp_rows(self, ab: tuple[int, int], x: np.ndarray, attn: np.ndarray, w: Weights) -> None:
        """Rows [a, b) of x += attn·Woᵀ + bo, then x += fc1(gelu_tanh(fc0(LN(x)))) (§5.3), in place."""
        a, b = ab
        xs = x[a:b]
        xs += attn[a:b] @ w["attn_out.weight"].T
        xs += w["attn_out.bias"]
        h = layer_norm(xs, w["ln2.weight"], w["ln2.bias"], self.hparams.layer_norm_eps) @ w["ffn_up.weight"].T
        h += w["ffn_up.bias"]
        gelu_tanh(h)
        xs += h @ w["ffn_down.weight"].T
        xs += w["ffn_down.bias"]

    def _norm_rows(self, ab: tuple[int, int], x: np.ndarray, w: Weights) -> None:
        """Final LN (§5.3) then the projector's pre_norm (§6), in place on rows [a, b)."""
        a, b = ab
        eps = self.hparams.layer_norm_eps
        y = layer_norm(x[a:b], w["v.post_ln.weight"], w["v.post_ln.bias"], eps)
        x[a:b] = layer_norm(y, w["mm.input_norm.weight"], w["mm.input_norm.bias"], PROJECTOR_LN_EPS)

    def _project_rows(self, ab: tuple[int, int], merged: np.ndarray, w: Weights, out: np.ndarray) -> None:
        """Projector MLP (§6) on merged tokens [a, b): gelu_erf(h·W1ᵀ + b1)·W2ᵀ + b2."""
        a, b = ab
        h = merged[a:b] @ w["mm.1.weight"].T
        h += w["mm.1.bias"]
        gelu_erf(h)
        np.matmul(h, w["mm.2.weight"].T, out=out[a:b])
        out[a:b] += w["mm.2.bias"]

    # -- whole stages ------------------------------------------------------------------------------------------
    @staticmethod
    def _run(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, *args) -> None:
        for _ in pool.map(lambda it: _quiet(fn, it, *args), items):
            pass

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        return row_chunks(n, self.row_chunk)

    def _attention(self, qkvh: np.ndarray, grids: Sequence[tuple[int, int]], pool: ThreadPoolExecutor,
                   out: np.ndarray) -> None:
        items = attention_items(grids, self.hparams.num_heads, self.max_score_bytes)
        self._run(pool, attend, items, qkvh[0], qkvh[1], qkvh[2], out, self._scratch)

    def _embed(self, patches: np.ndarray, grids: Sequence[tuple[int, int]], pool: ThreadPoolExecutor,
               w: Weights) -> np.ndarray:
        hp = self.hparams
        table = w["v.position_embd.weight"].reshape(hp.pos_emb_height, hp.pos_emb_width, hp.hidden_size)
        pos = np.concatenate([resample_pos_emb(table, gh, gw) for gh, gw in grids])
        x = np.empty((patches.shape[0], hp.hidden_size), np.float32)
        self._run(pool, self._embed_rows, self._chunks(len(x)), patches, pos, w, x)
        return x

    def _project(self, x: np.ndarray, grids: Sequence[tuple[int, int]], pool: ThreadPoolExecutor,
                 w: Weights) -> list[np.ndarray]:
        """Final LN (§5.3), 2x2 merge (§5.5) and projector (§6): per image [gh*gw/4, projection_dim] float32."""
        hp = self.hparams
        self._run(pool, self._norm_rows, self._chunks(len(x)), x, w)
        merged, start = [], 0
        for gh, gw in grids:
            merged.append(merge_2x2(x[start:start + gh * gw], gh, gw, hp.merge_size))
            start += gh * gw
        m = np.concatenate(merged)
        out = np.empty((len(m), hp.projection_dim), np.float32)
        self._run(pool, self._project_rows, self._chunks(len(m)), m, w, out)
        sizes = np.cumsum([gh * gw // hp.merge_size ** 2 for gh, gw in grids])[:-1]
        return [np.ascontiguousarray(a) for a in np.split(out, sizes)]

    def encode(self, pixel_values: np.ndarray, grid_hws: object, progress: Progress | None = None) -> list[np.ndarray]:
        """Image embeddings, one [gh*gw/4, projection_dim] float32 array per image (docs/model.md §5, §6).

        ``pixel_values`` [Σ gh·gw, 3, p, p] and ``grid_hws`` [n_images, 2], as ``kimivl_edge.image.preprocess``
        makes them.
        ``progress(i + 1, n_layers, "layer")`` (``Progress``) is called when block i (0-based) has finished.
        """
        patches, grids = self._check_inputs(pixel_values, grid_hws)
        with self._lock, single_threaded_blas():  # the weight buffers and the cache are shared by calls
            return _quiet(self._encode_locked, patches, grids, progress) if grids else []

    def _encode_locked(self, patches: np.ndarray, grids: list[tuple[int, int]], progress: Progress | None
                       ) -> list[np.ndarray]:
        pool, cached = worker_pool(self.threads), set(self._cache)
        try:
            return self._encode(patches, grids, pool, progress)
        except BaseException:
            for part in set(self._cache) - cached:  # possibly half decoded
                del self._cache[part]
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _encode(self, patches: np.ndarray, grids: list[tuple[int, int]], pool: ThreadPoolExecutor,
                progress: Progress | None) -> list[np.ndarray]:
        hp = self.hparams
        n, n_layers = patches.shape[0], hp.num_layers
        w, futs = self._submit_decode("embed", pool)
        cur, futs0 = self._submit_decode(0, pool)
        self._wait(futs)
        x = self._embed(patches, grids, pool, w)
        ang = np.concatenate([rope_angles(gh, gw, hp.head_dim, hp.rope_layout) for gh, gw in grids])
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        qkvh = np.empty((3, hp.num_heads, n, hp.head_dim), np.float32)
        attn = np.empty((n, hp.num_heads, hp.head_dim), np.float32)
        chunks, futs = self._chunks(n), futs0
        for i in range(n_layers):
            self._wait(futs)
            nxt = i + 1 if i + 1 < n_layers else "project"
            w_next, futs = self._submit_decode(nxt, pool)
            self._run(pool, self._qkv_rows, chunks, x, cur, cos, sin, qkvh)
            self._attention(qkvh, grids, pool, attn)
            self._run(pool, self._mlp_rows, chunks, x, attn.reshape(n, -1), cur)
            if progress is not None:
                progress(i + 1, n_layers, "layer")
            cur = w_next
        self._wait(futs)
        del qkvh, attn
        return self._project(x, grids, pool, cur)
