"""N sequences in one llama.cpp context (the server's ``--parallel N``): each sequence's prompt with prefix reuse,
and the decode steps of all running sequences in one ``llama_batch`` (continuous batching).

It is a second context on the ``Decoder``'s loaded model (the weights are shared; the decoder's own context stays
idle), with ``n_seq_max = N`` and N times the decoder's context, split per sequence (``kv_unified`` off: each
sequence attends only to its own cells). Positions, image embedding rows and the cache keys (what occupies each
cached position, for prefix reuse) follow ``Decoder``'s conventions (``Decoder.segment_keys``)."""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .decoder import KV_TYPES, Decoder, ImageBlock, Segment, _backend, _counter, _take_errors
from .errors import KimiVLError, UsageError

if TYPE_CHECKING:
    from .vision import Progress


_EMPTY_STREAM = struct.pack("<I", 0)


def one_stream(state: bytes, n_stream: int, stream: int) -> bytes:
    """A sequence's state saved from an ``n_stream`` context (``kv_unified`` off: sequence k is stream k) in the
    layout of a one-stream context, as sequence 0. llama.cpp writes a sequence state as a magic (u32), the sequence
    id (i32), the stream count (u32), then per stream its cell count (u32) followed, when not 0, by the cells; only
    the sequence's own stream holds cells."""
    head = struct.pack("<iI", stream, n_stream) + _EMPTY_STREAM * stream
    tail = _EMPTY_STREAM * (n_stream - 1 - stream)
    if not (state[4:4 + len(head)] == head and state.endswith(tail)):
        raise KimiVLError(f"unexpected llama.cpp sequence state layout (not stream {stream} of {n_stream})")
    return state[:4] + struct.pack("<iI", 0, 1) + state[4 + len(head): len(state) - len(tail)]


def in_stream(state: bytes, n_stream: int, stream: int) -> bytes:
    """The inverse of ``one_stream``: a one-stream state as sequence and stream ``stream`` of an ``n_stream``
    context (a state of another layout is passed on unchanged, for llama.cpp to refuse)."""
    if state[4:12] != struct.pack("<iI", 0, 1):
        return state
    return (state[:4] + struct.pack("<iI", stream, n_stream) + _EMPTY_STREAM * stream + state[12:]
            + _EMPTY_STREAM * (n_stream - 1 - stream))


class BatchDecoder:
    def __init__(self, dec: Decoder, n_seq: int):
        lc = self._lc = _backend()
        s = dec.settings
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = dec.n_ctx * n_seq, n_seq, False
        cp.n_batch, cp.n_ubatch = dec.n_batch, min(s.n_ubatch, s.n_batch)  # as the Decoder's (its saved states)
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
        self.n_evaluated = 0  # prompt positions evaluated by prefill, over all sequences (as Decoder.n_evaluated)
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
            self.n_evaluated += e - s
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

    def save_state(self, seq: int) -> bytes:
        """llama.cpp's state of sequence ``seq`` (its KV cells), in the one-stream layout ``Decoder.save_state``
        writes (``one_stream``), so either restores the other's prefix-cache entries."""
        lc = self._lc
        n = lc.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        if lc.llama_state_seq_get_data(self.ctx, buf, n, seq) != n:
            raise KimiVLError(f"llama.cpp could not save the sequence state ({_take_errors()})")
        return one_stream(bytes(buf), self.n_seq, seq)

    def load_state(self, seq: int, state: bytes, keys: Sequence[Hashable]) -> bool:
        """Replace sequence ``seq`` by a saved state holding ``keys`` (from this class or ``Decoder.save_state``);
        False (the sequence left empty) if llama.cpp refuses it."""
        self._truncate(seq, 0)
        try:
            state = in_stream(state, self.n_seq, seq)
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            ok = self._lc.llama_state_seq_set_data(self.ctx, buf, len(state), seq) == len(state)
            ok = ok and self._lc.llama_memory_seq_pos_max(self._mem, seq) + 1 == len(keys)
        except BaseException:
            self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)  # part of the state may be in, the keys hold none
            raise
        if not ok:
            _take_errors()
            self._lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            return False
        self._keys[seq] = list(keys)
        return True

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


class SequenceView:
    """One sequence of a ``BatchDecoder`` with the ``Decoder`` methods the persistent prefix cache uses
    (``KimiVL.restore_prefix`` / ``store_prefix``), so a ``--parallel`` slot restores and stores entries as the
    single decoder does, in the same format."""

    def __init__(self, bd: BatchDecoder, seq: int):
        self.bd, self.seq = bd, seq

    @property
    def n_past(self) -> int:
        return self.bd.n_past(self.seq)

    def cached_prefix(self, keys: Sequence[Hashable]) -> int:
        return self.bd.common_prefix(self.seq, keys)

    def prefill(self, segments: Sequence[Segment]) -> None:
        self.bd.prefill(self.seq, segments)

    def save_state(self) -> bytes:
        return self.bd.save_state(self.seq)

    def load_state(self, state: bytes, keys: Sequence[Hashable]) -> bool:
        return self.bd.load_state(self.seq, state, keys)
