"""N sequences in one llama.cpp context (the server's ``--parallel N``): each sequence's prompt with prefix reuse,
and the decode steps of all running sequences in one ``llama_batch`` (continuous batching).

It is a second context on the ``Decoder``'s loaded model (the weights are shared; the decoder's own context stays
idle), with ``n_seq_max = N`` and N times the decoder's context, split per sequence (``kv_unified`` off: each
sequence attends only to its own cells). Positions, image embedding rows and the cache keys (what occupies each
cached position, for prefix reuse) follow ``Decoder``'s conventions (``Decoder.segment_keys``)."""
from __future__ import annotations

import ctypes
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .decoder import KV_TYPES, Decoder, ImageBlock, Segment, _backend, _counter, _take_errors
from .errors import KimiVLError, UsageError

if TYPE_CHECKING:
    from .vision import Progress


class BatchDecoder:
    def __init__(self, dec: Decoder, n_seq: int):
        lc = self._lc = _backend()
        s = dec.settings
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = dec.n_ctx * n_seq, n_seq, False
        cp.n_batch = cp.n_ubatch = dec.n_batch
        cp.n_threads = cp.n_threads_batch = lc.llama_n_threads(dec.ctx)
        cp.type_k = cp.type_v = KV_TYPES[s.kv_type]
        cp.flash_attn_type = 1 if s.flash_attn else 0
        cp.no_perf = True
        self._ctx = lc.llama_init_from_model(dec.model, cp)
        if not self._ctx:
            raise KimiVLError(f"llama.cpp could not create a context of {n_seq} x {dec.n_ctx} tokens "
                              f"({_take_errors()})")
        self.n_seq, self.n_ctx, self.n_batch, self.n_embd = n_seq, dec.n_ctx, dec.n_batch, dec.n_embd
        self.n_vocab = dec.n_vocab
        self._mem = lc.llama_get_memory(self._ctx)
        self._keys: list[list[Hashable]] = [[] for _ in range(n_seq)]
        self._used = [0] * n_seq  # when each sequence was last prefilled (a counter), for choose()
        self._tok = lc.llama_batch_init(max(self.n_batch, n_seq), 0, 1)
        self._emb = lc.llama_batch_init(self.n_batch, self.n_embd, 1)

    def close(self) -> None:
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            self._lc.llama_batch_free(self._tok)
            self._lc.llama_batch_free(self._emb)
            self._lc.llama_free(ctx)

    @property
    def ctx(self):
        if not self._ctx:
            raise KimiVLError("the model is closed")
        return self._ctx

    def n_past(self, seq: int) -> int:
        return len(self._keys[seq])

    def common_prefix(self, seq: int, keys: Sequence[Hashable]) -> int:
        n = 0
        for a, b in zip(self._keys[seq], keys):
            if a != b:
                break
            n += 1
        return n

    def choose(self, free: Sequence[int], keys: Sequence[Hashable]) -> int:
        """The free sequence to prefill ``keys`` into: the one whose cache shares the longest prefix with them if
        that covers at least half of what it holds (a follow-up lands where its conversation is, as llama-server's
        slot similarity does), else the least recently used one."""
        def shared(s: int) -> int:
            return self.common_prefix(s, keys)

        alike = [s for s in free if self._keys[s] and 2 * shared(s) >= len(self._keys[s])]
        return max(alike, key=shared) if alike else min(free, key=lambda s: self._used[s])

    def prefill(self, seq: int, segments: Sequence[Segment], progress: Progress | None = None) -> int:
        """Make sequence ``seq`` hold exactly ``segments``, evaluating only what follows its cached prefix (the last
        position is always evaluated: its logits are batch entry -1 afterwards). Returns the positions evaluated.
        ``progress(done, total, "token")`` after each evaluated chunk, as ``Decoder.prefill``'s."""
        keys = Decoder.segment_keys(segments)
        if not 0 < len(keys) <= self.n_ctx:
            raise UsageError(f"prompt of {len(keys)} positions does not fit the context of {self.n_ctx}")
        common = min(self.common_prefix(seq, keys), len(keys) - 1)
        self._used[seq] = max(self._used) + 1
        self._truncate(seq, common)
        advance = _counter(progress, len(keys) - common)
        try:
            pos = 0
            for seg in segments:
                n = len(seg.rows) if isinstance(seg, ImageBlock) else len(seg)
                lo = max(common - pos, 0)
                if lo < n:
                    self._eval(seq, seg, lo, pos, keys, len(keys) - 1, advance)
                pos += n
        except BaseException:
            self._resync([seq])
            raise
        return len(keys) - common

    def _eval(self, seq: int, seg: Segment, lo: int, pos0: int, keys: list[Hashable], last: int,
              advance: Callable[[int], None]) -> None:
        """Evaluate ``seg[lo:]`` (at positions pos0 + lo ...) in chunks of ``n_batch``; logits only for ``last``."""
        emb = isinstance(seg, ImageBlock)
        b = self._emb if emb else self._tok
        rows = np.ascontiguousarray(seg.rows, dtype=np.float32) if isinstance(seg, ImageBlock) else None
        n = len(seg.rows) if isinstance(seg, ImageBlock) else len(seg)
        for s in range(lo, n, self.n_batch):
            e = min(s + self.n_batch, n)
            if rows is not None:
                ctypes.memmove(b.embd, rows[s:e].ctypes.data, rows[s:e].nbytes)
            for j in range(e - s):
                p = pos0 + s + j
                if rows is None:
                    b.token[j] = int(seg[s + j])  # type: ignore[index]
                b.pos[j], b.n_seq_id[j], b.logits[j] = p, 1, p == last
                b.seq_id[j][0] = seq
            self._decode(b, e - s)
            self._keys[seq].extend(keys[pos0 + s: pos0 + e])
            advance(e - s)

    def step(self, tokens: dict[int, int]) -> dict[int, int]:
        """Append one token to each sequence in ``tokens`` (sequence -> token) in one llama_decode; returns each
        sequence's batch entry, whose logits the sampler reads."""
        b = self._tok
        for i, (seq, tok) in enumerate(tokens.items()):
            if len(self._keys[seq]) >= self.n_ctx:
                raise KimiVLError(f"context of {self.n_ctx} tokens is full")
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(tok), len(self._keys[seq]), 1, 1
            b.seq_id[i][0] = seq
        try:
            self._decode(b, len(tokens))
        except BaseException:
            self._resync(list(tokens))
            raise
        for seq, tok in tokens.items():
            self._keys[seq].append(int(tok))
        return {seq: i for i, seq in enumerate(tokens)}

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self._lc.llama_decode(self.ctx, batch)
        if rc != 0:
            raise KimiVLError(f"llama_decode failed (code {rc}); the context may be full")

    def _truncate(self, seq: int, n: int) -> None:
        if n < len(self._keys[seq]):
            del self._keys[seq][n:]
            self._lc.llama_memory_seq_rm(self._mem, seq, n, -1)

    def _resync(self, seqs: list[int]) -> None:
        """After an interrupted evaluation: keep, per sequence, the positions both llama.cpp and the keys hold."""
        for seq in seqs:
            n = min(len(self._keys[seq]), self._lc.llama_memory_seq_pos_max(self._mem, seq) + 1)
            self._lc.llama_memory_seq_rm(self._mem, seq, n, -1)
            del self._keys[seq][n:]
