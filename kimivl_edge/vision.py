"""Numpy MoonViT + 2x2 merge + projector on an mmproj GGUF (reference doc §5, §6): the runtime's vision encoder.

    enc = VisionEncoder("mmproj-Kimi-VL-A3B-Instruct-Q8_0.gguf")
    pixel_values, grid_hws = preprocess(images, enc.mmproj.image_processor_config())
    embeds = enc.encode(pixel_values, grid_hws)      # one [gh*gw/4, projection_dim] float32 array per image

Everything is float32 on BLAS matmuls; quantized weights (F16, BF16, Q8_0, Q4_0) are decoded to float32 per tensor,
either for each layer as it runs (default: at most two layers' weights in memory, the next one decoded in the
background) or once and kept (``weight_cache=True``). Both paths run the same matmuls, so their outputs are equal.

Attention runs per image (block-diagonal, never a global mask: reference doc §5.3, §10.1) and in query blocks whose
score matrix stays under ``max_score_bytes`` (64 MiB by default); the softmax is done in place on that block.
RoPE follows the Q/K row layout the file declares (``MmprojFile.hparams.rope_layout``; reference doc §5.4).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from .errors import UsageError
from .mmproj import MmprojFile

__all__ = [
    "VisionEncoder", "bicubic_matrix", "resample_pos_emb", "rope_angles", "apply_rope", "erf", "gelu_erf",
    "gelu_tanh", "layer_norm", "query_block_rows", "merge_2x2",
]

BICUBIC_A = -0.75           # PyTorch's bicubic coefficient (reference doc §5.2)
ROPE_THETA = 10000.0        # MoonViT's 2-D RoPE base (reference doc §5.4; llama.cpp hard-codes it too)
ROPE_MAX_GRID = 512         # the RoPE table's side in patches (reference doc §5.4): valid grids 1..512
PROJECTOR_LN_EPS = 1e-5     # nn.LayerNorm default of the projector's pre_norm (reference doc §6)
DEFAULT_SCORE_BYTES = 64 << 20
MLP_ROWS = 4096             # tokens per MLP chunk: bounds the [rows, intermediate] activation

Progress = Callable[[int, int], None]


# ---------------------------------------------------------------------------------------------------------------
# §5.2 position embedding: exact PyTorch bicubic (align_corners=False, A = -0.75) as two matrices

def _cubic(d: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
    """Keys' cubic kernel K(d) (reference doc §5.2)."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 1-D resampling matrix; clamped taps add up (reference doc §5.2). Read-only, cached."""
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
    [n, d/2] (reference doc §5.4)."""
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


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """In place 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715x³))): the vision MLP activation (reference doc §5.3)."""
    inner = x * x
    inner *= np.float32(0.044715)
    inner += 1.0
    inner *= x
    inner *= np.float32(math.sqrt(2.0 / math.pi))
    np.tanh(inner, out=inner)
    inner += 1.0
    x *= 0.5
    x *= inner
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
    """In place exact GELU 0.5·x·(1 + erf(x/√2)) on a float32 array: the projector activation (reference doc §6).

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
# §5.3 attention, per image, in query blocks

def query_block_rows(n: int, max_score_bytes: int) -> int:
    """Query rows per block so one head's [rows, n] float32 score block fits ``max_score_bytes`` (at least 1)."""
    return max(1, min(n, max_score_bytes // (4 * n)))


def _attention_items(n: int, heads: int, max_score_bytes: int) -> list[tuple[int, int, int, int]]:
    """(head0, head1, row0, row1) blocks covering one image: several heads at once when whole [n, n] score matrices
    fit the budget, else one head and ``query_block_rows`` query rows."""
    full = 4 * n * n
    if full <= max_score_bytes:
        hb = max(1, min(heads, max_score_bytes // full))
        return [(h, min(h + hb, heads), 0, n) for h in range(0, heads, hb)]
    b = query_block_rows(n, max_score_bytes)
    return [(h, h + 1, r, min(r + b, n)) for h in range(heads) for r in range(0, n, b)]


PARALLEL_MIN_ELEMS = 1 << 18  # elementwise passes smaller than this stay in the calling thread


def _row_chunks(n_rows: int, parts: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, n_rows, parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _map_rows(fn: Callable[[np.ndarray], np.ndarray | None], a: np.ndarray, pool: ThreadPoolExecutor | None,
              parts: int) -> list:
    """Apply ``fn`` to row chunks of the 2-D array ``a`` (elementwise numpy only, which releases the GIL; BLAS is
    never called from the pool, so it does not fight BLAS's own threads). Returns the per-chunk results in order."""
    if pool is None or parts < 2 or a.size < PARALLEL_MIN_ELEMS or a.shape[0] < 2:
        return [fn(a)]
    return list(pool.map(lambda ab: fn(a[ab[0]:ab[1]]), _row_chunks(a.shape[0], parts)))


def _softmax_numerators(s: np.ndarray) -> np.ndarray:
    """In place s <- exp(s - rowmax(s)) for s [rows, n]; returns the row sums [rows, 1]."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    return s.sum(axis=-1, keepdims=True)


def _attend_block(q: np.ndarray, k: np.ndarray, v: np.ndarray, pool: ThreadPoolExecutor | None = None,
                  parts: int = 1) -> np.ndarray:
    """softmax(q kᵀ) v for q [hb, b, d] (scaled by 1/√d already), k, v [hb, n, d]; softmax in place on scores."""
    s = np.matmul(q, k.transpose(0, 2, 1))          # [hb, b, n]
    hb, b, n = s.shape
    denom = np.concatenate(_map_rows(_softmax_numerators, s.reshape(hb * b, n), pool, parts))
    o = np.matmul(s, v)                              # [hb, b, d]
    o /= denom.reshape(hb, b, 1)
    return o


# ---------------------------------------------------------------------------------------------------------------
# the encoder

LAYER_TENSORS = ("ln1.weight", "ln1.bias", "attn_out.weight", "attn_out.bias", "ln2.weight", "ln2.bias",
                 "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias")


def check_patches(pixel_values: np.ndarray, grid_hws: object, p: int, m: int
                  ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Validate ``pixel_values`` [n, 3, p, p] (or [n, 3*p*p]) against an integer ``grid_hws`` [n_images, 2] whose
    sides are multiples of the merge ``m`` within the RoPE table; returns [n, 3*p*p] float32 and the grids.
    Shared by both vision backends."""
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


class VisionEncoder:
    """MoonViT + merge + projector on a Kimi-VL mmproj GGUF (reference doc §5, §6), numpy float32.

    ``weight_cache``: keep every decoded weight (fast repeated encodes, ~4 bytes per parameter of RAM) instead of
    decoding each layer when it runs. ``threads``: worker threads for the large elementwise passes (softmax, GELU)
    and for decoding the next layer's weights in the background (default: all cores; 1 = none). Matmuls run in the
    calling thread on BLAS's own threads, which are not limited here. ``max_score_bytes``: size bound of the one
    attention score block that exists at a time.
    """

    def __init__(self, mmproj: MmprojFile | str | os.PathLike, weight_cache: bool = False,
                 threads: int | None = None, max_score_bytes: int = DEFAULT_SCORE_BYTES):
        self.mmproj = mmproj if isinstance(mmproj, MmprojFile) else MmprojFile(mmproj)
        self.hparams = self.mmproj.hparams
        self.weight_cache = bool(weight_cache)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or os.cpu_count() or 1
        if isinstance(max_score_bytes, bool) or not isinstance(max_score_bytes, int) or max_score_bytes < 4:
            raise UsageError(f"max_score_bytes must be an integer >= 4, got {max_score_bytes!r}")
        self.max_score_bytes = max_score_bytes
        self._cache: dict[str, np.ndarray] = {}

    # -- weights -----------------------------------------------------------------------------------------------
    def _weight(self, name: str) -> np.ndarray:
        w = self._cache.get(name)
        if w is None:
            w = self.mmproj.float32(name)
            if self.weight_cache:
                self._cache[name] = w
        return w

    def _layer_weights(self, i: int) -> dict[str, np.ndarray]:
        """Block i's float32 weights; Q, K, V fused into one [3D, D] matrix (reference doc §3.4 row order)."""
        key = f"v.blk.{i}.attn_qkv"
        p = f"v.blk.{i}."
        out = {t: self._weight(p + t) for t in LAYER_TENSORS}
        qkv_w, qkv_b = self._cache.get(key + ".weight"), self._cache.get(key + ".bias")
        if qkv_w is None:
            qkv_w = np.concatenate([self.mmproj.float32(p + f"attn_{x}.weight") for x in "qkv"])
            qkv_b = np.concatenate([self.mmproj.float32(p + f"attn_{x}.bias") for x in "qkv"])
            if self.weight_cache:
                self._cache[key + ".weight"], self._cache[key + ".bias"] = qkv_w, qkv_b
        out["qkv.weight"], out["qkv.bias"] = qkv_w, qkv_b
        return out

    def pos_table(self) -> np.ndarray:
        """The pos-emb table as [H, W, C] float32 (stored as [H*W, C], reference doc §5.2)."""
        hp = self.hparams
        return self._weight("v.position_embd.weight").reshape(hp.pos_emb_height, hp.pos_emb_width, hp.hidden_size)

    # -- checks ------------------------------------------------------------------------------------------------
    def _check_inputs(self, pixel_values: np.ndarray, grid_hws: object) -> tuple[np.ndarray, list[tuple[int, int]]]:
        return check_patches(pixel_values, grid_hws, self.hparams.patch_size, self.hparams.merge_size)

    # -- stages ------------------------------------------------------------------------------------------------
    def embed(self, patches: np.ndarray, grids: Sequence[tuple[int, int]]) -> np.ndarray:
        """Patch embedding (conv as a matmul, §5.1) plus the bicubic-resampled position table (§5.2): [n, D]."""
        w = self._weight("v.patch_embd.weight")
        x = patches @ w.reshape(w.shape[0], -1).T
        x += self._weight("v.patch_embd.bias")
        table, start = self.pos_table(), 0
        for gh, gw in grids:
            x[start:start + gh * gw] += resample_pos_emb(table, gh, gw)
            start += gh * gw
        return x

    def _rope_tables(self, grids: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [n, head_dim/2] float32 for all patches, in the file's Q/K layout (§5.4)."""
        hp = self.hparams
        ang = np.concatenate([rope_angles(gh, gw, hp.head_dim, hp.rope_layout) for gh, gw in grids])
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, grids: Sequence[tuple[int, int]],
                  pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        """Block-diagonal attention (§5.3): q, k, v [n, heads, d] (RoPE applied) -> [n, heads*d] float32."""
        n_tot, heads, d = q.shape
        out = np.empty((n_tot, heads, d), dtype=np.float32)
        scale = np.float32(1.0 / math.sqrt(d))
        start = 0
        for gh, gw in grids:
            n = gh * gw
            qi = np.ascontiguousarray(q[start:start + n].transpose(1, 0, 2)) * scale   # [heads, n, d]
            ki = np.ascontiguousarray(k[start:start + n].transpose(1, 0, 2))
            vi = np.ascontiguousarray(v[start:start + n].transpose(1, 0, 2))
            for h0, h1, r0, r1 in _attention_items(n, heads, self.max_score_bytes):
                o = _attend_block(qi[h0:h1, r0:r1], ki[h0:h1], vi[h0:h1], pool, self.threads)
                out[start + r0:start + r1, h0:h1] = o.transpose(1, 0, 2)
            start += n
        return out.reshape(n_tot, heads * d)

    def block(self, i: int, x: np.ndarray, weights: dict[str, np.ndarray], cos: np.ndarray, sin: np.ndarray,
              grids: Sequence[tuple[int, int]], pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        """One pre-norm block (§5.3), updating x [n, D] in place: LN, QKV, RoPE, attention, wo, LN, GELU-tanh MLP."""
        hp, w = self.hparams, weights
        n = x.shape[0]
        y = layer_norm(x, w["ln1.weight"], w["ln1.bias"], hp.layer_norm_eps)
        qkv = y @ w["qkv.weight"].T
        qkv += w["qkv.bias"]
        del y
        qkv = qkv.reshape(n, 3, hp.num_heads, hp.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        apply_rope(q, cos, sin)
        apply_rope(k, cos, sin)
        o = self.attention(q, k, v, grids, pool)
        del qkv, q, k, v
        x += o @ w["attn_out.weight"].T
        x += w["attn_out.bias"]
        del o
        for s in range(0, n, MLP_ROWS):
            xs = x[s:s + MLP_ROWS]
            h = layer_norm(xs, w["ln2.weight"], w["ln2.bias"], hp.layer_norm_eps) @ w["ffn_up.weight"].T
            h += w["ffn_up.bias"]
            _map_rows(gelu_tanh, h, pool, self.threads)
            xs += h @ w["ffn_down.weight"].T
            xs += w["ffn_down.bias"]
        return x

    def project(self, x: np.ndarray, grids: Sequence[tuple[int, int]],
                pool: ThreadPoolExecutor | None = None) -> list[np.ndarray]:
        """Final LN (§5.3), 2x2 merge (§5.5) and projector (§6): per image [gh*gw/4, projection_dim] float32."""
        hp = self.hparams
        x = layer_norm(x, self._weight("v.post_ln.weight"), self._weight("v.post_ln.bias"), hp.layer_norm_eps)
        x = layer_norm(x, self._weight("mm.input_norm.weight"), self._weight("mm.input_norm.bias"), PROJECTOR_LN_EPS)
        merged, start = [], 0
        for gh, gw in grids:
            merged.append(merge_2x2(x[start:start + gh * gw], gh, gw, hp.merge_size))
            start += gh * gw
        h = np.concatenate(merged) if merged else np.zeros((0, hp.merged_dim), np.float32)
        del x, merged
        h = h @ self._weight("mm.1.weight").T
        h += self._weight("mm.1.bias")
        _map_rows(gelu_erf, h, pool, self.threads)
        out = h @ self._weight("mm.2.weight").T
        out += self._weight("mm.2.bias")
        sizes = np.cumsum([gh * gw // hp.merge_size ** 2 for gh, gw in grids])[:-1]
        return [np.ascontiguousarray(a) for a in np.split(out, sizes)]

    def encode(self, pixel_values: np.ndarray, grid_hws: object, progress: Progress | None = None) -> list[np.ndarray]:
        """Image embeddings, one [gh*gw/4, projection_dim] float32 array per image (reference doc §5, §6).

        ``pixel_values`` [Σ gh·gw, 3, p, p] and ``grid_hws`` [n_images, 2], as ``kimivl_edge.image.preprocess``
        makes them.
        ``progress(i, n_layers)`` is called after block i (0-based) has finished.
        """
        patches, grids = self._check_inputs(pixel_values, grid_hws)
        if not grids:
            return []
        n_layers = self.hparams.num_layers
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        try:
            x = self.embed(patches, grids)
            cos, sin = self._rope_tables(grids)
            nxt: Future | None = None
            weights = self._layer_weights(0)
            for i in range(n_layers):
                if pool is not None and i + 1 < n_layers:
                    nxt = pool.submit(self._layer_weights, i + 1)  # decode ahead while block i runs
                self.block(i, x, weights, cos, sin, grids, pool)
                if progress is not None:
                    progress(i, n_layers)
                if i + 1 < n_layers:
                    weights = nxt.result() if nxt is not None else self._layer_weights(i + 1)
                    nxt = None
            del weights
            return self.project(x, grids, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
