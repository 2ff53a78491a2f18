"""The MoE decoder through llama.cpp's low-level API: token batches and embedding batches, KV-cache reuse.

A prompt is a list of segments: runs of token ids, and blocks of image-embedding rows (one row per merged image
token, projector output, inserted without scaling). Each segment is evaluated in its own ``llama_decode`` calls,
chunked to ``n_batch``, with continuous positions 0..T-1 (1-D RoPE over image rows too, reference doc §7.1).

KV reuse: the decoder remembers a key per cached position (the token id, or (image key, row) for an embedding row).
A new prompt that starts with the cached prefix evaluates only what follows, so a follow-up question about an image
costs only the new tokens.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import KimiVLError, UsageError

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "bf16": 30}


@dataclass(frozen=True)
class ImageBlock:
    """Embedding rows for one image; ``key`` identifies the image (content hash) for KV reuse."""

    rows: np.ndarray  # [n, n_embd] float32
    key: Hashable


Segment = "Sequence[int] | ImageBlock"


@dataclass
class DecoderSettings:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None
    kv_type: str = "f16"  # llama.cpp's default; tests use f32 (an F16 KV cache moves logits visibly)
    flash_attn: bool = False

    def __post_init__(self):
        if self.kv_type not in KV_TYPES:
            raise UsageError(f"unknown KV cache type {self.kv_type!r} (choose from {', '.join(KV_TYPES)})")
        if not 16 <= self.n_ctx <= 131072:
            raise UsageError(f"context size {self.n_ctx} out of range (16..131072)")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise UsageError("n_batch and n_ubatch must be >= 1")


_LOG_CB = None  # keeps the ctypes callback alive


def _log(level, text, user_data):
    """llama.cpp's log goes nowhere unless KIMIVL_EDGE_VERBOSE is set."""
    if os.environ.get("KIMIVL_EDGE_VERBOSE"):
        import sys

        sys.stderr.write(text.decode("utf-8", "replace"))


def _backend():
    global _LOG_CB
    import llama_cpp

    if _LOG_CB is None:
        llama_cpp.llama_backend_init()
        _LOG_CB = llama_cpp.llama_log_callback(_log)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    return llama_cpp


class Decoder:
    """One llama.cpp model + context, a single sequence, with prefix-reusing evaluation."""

    def __init__(self, model_path: str | Path, settings: DecoderSettings | None = None):
        lc = _backend()
        self.settings = s = settings or DecoderSettings()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self._model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self._model:
            raise KimiVLError(f"llama.cpp could not load {model_path} (set KIMIVL_EDGE_VERBOSE=1 for its log)")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = s.n_ctx, s.n_batch, min(s.n_ubatch, s.n_batch)
        threads = s.n_threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = KV_TYPES[s.kv_type]
        cp.no_perf = True
        # llama.cpp's CPU flash attention rounds through F16 (5e-4 relative logit error on the tiny model): opt-in.
        cp.flash_attn_type = 1 if s.flash_attn else 0
        self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise KimiVLError(f"llama.cpp could not create a context of {s.n_ctx} tokens")
        self._lc = lc
        self.n_embd = lc.llama_model_n_embd(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_batch = lc.llama_n_batch(self._ctx)
        self._mem = lc.llama_get_memory(self._ctx)
        self._keys: list[Hashable] = []  # what occupies each cached position
        self.n_evaluated = 0             # positions evaluated by llama_decode since load (for tests and stats)
        self._tok_batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = lc.llama_batch_init(self.n_batch, self.n_embd, 1)

    # -- lifecycle --------------------------------------------------------------------------------------------
    def close(self) -> None:
        lc = self._lc
        if getattr(self, "_ctx", None):
            lc.llama_batch_free(self._tok_batch)
            lc.llama_batch_free(self._emb_batch)
            lc.llama_free(self._ctx)
            lc.llama_model_free(self._model)
            self._ctx = self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def n_past(self) -> int:
        return len(self._keys)

    def reset(self) -> None:
        self._lc.llama_memory_clear(self._mem, True)
        self._keys = []

    # -- evaluation -------------------------------------------------------------------------------------------
    @staticmethod
    def segment_keys(segments: Sequence[Segment]) -> list[Hashable]:
        keys: list[Hashable] = []
        for seg in segments:
            if isinstance(seg, ImageBlock):
                keys.extend((seg.key, i) for i in range(len(seg.rows)))
            else:
                keys.extend(int(t) for t in seg)
        return keys

    def prompt(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        """Make the cache hold exactly ``segments``, evaluating only what is not cached yet. Returns the logits of
        the last position ([n_vocab]), or with ``all_logits`` of every newly evaluated position ([n, n_vocab])."""
        keys = self.segment_keys(segments)
        if not keys:
            raise UsageError("empty prompt")
        if len(keys) > self.n_ctx:
            raise UsageError(f"prompt of {len(keys)} tokens (incl. image tokens) exceeds the context of "
                             f"{self.n_ctx}; raise n_ctx or cap the image tokens")
        common = 0
        for a, b in zip(self._keys, keys):
            if a != b:
                break
            common += 1
        common = min(common, len(keys) - 1)  # re-evaluate at least the last position to get its logits
        if all_logits:
            common = 0
        self._truncate(common)
        out = []
        pos = 0
        for seg in segments:
            n = len(seg.rows) if isinstance(seg, ImageBlock) else len(seg)
            lo = max(common - pos, 0)
            if lo < n:
                if isinstance(seg, ImageBlock):
                    out += self._eval_embd(seg.rows[lo:], pos + lo, [(seg.key, i) for i in range(lo, n)], all_logits)
                else:
                    out += self._eval_tokens([int(t) for t in seg[lo:]], pos + lo, all_logits)
            pos += n
        return np.stack(out) if all_logits else out[-1]

    def _truncate(self, n: int) -> None:
        if n < len(self._keys):
            self._lc.llama_memory_seq_rm(self._mem, 0, n, -1)
            del self._keys[n:]

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self._lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise KimiVLError(f"llama_decode failed (code {rc}); the context may be full")
        self.n_evaluated += n

    def _logits(self, i: int) -> np.ndarray:
        p = self._lc.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def _eval_tokens(self, ids: list[int], pos0: int, all_logits: bool) -> list[np.ndarray]:
        b, out = self._tok_batch, []
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s: s + self.n_batch]
            last = s + len(chunk) == len(ids)
            for j, t in enumerate(chunk):
                b.token[j] = t
                b.pos[j] = pos0 + s + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = all_logits or (last and j == len(chunk) - 1)
            self._decode(b, len(chunk))
            self._keys.extend(chunk)
            if all_logits:
                out += [self._logits(j) for j in range(len(chunk))]
            elif last:
                out.append(self._logits(len(chunk) - 1))
        return out

    def _eval_embd(self, rows: np.ndarray, pos0: int, keys: list, all_logits: bool) -> list[np.ndarray]:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise KimiVLError(f"image embeddings have width {rows.shape[-1]}, the text model expects {self.n_embd}")
        b, out = self._emb_batch, []
        for s in range(0, len(rows), self.n_batch):
            chunk = rows[s: s + self.n_batch]
            n = len(chunk)
            last = s + n == len(rows)
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for j in range(n):
                b.pos[j] = pos0 + s + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = all_logits or (last and j == n - 1)
            self._decode(b, n)
            self._keys.extend(keys[s: s + n])
            if all_logits:
                out += [self._logits(j) for j in range(n)]
            elif last:
                out.append(self._logits(n - 1))
        return out

    def append(self, token: int) -> np.ndarray:
        """Evaluate one generated token at the end of the cache; returns its logits."""
        if len(self._keys) >= self.n_ctx:
            raise KimiVLError(f"context of {self.n_ctx} tokens is full")
        return self._eval_tokens([int(token)], len(self._keys), False)[0]

    @property
    def ctx(self):
        return self._ctx

    @property
    def model(self):
        return self._model
