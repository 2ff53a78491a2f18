"""``--parallel N``: up to N turns decode together, one token each per ``BatchDecoder.step`` (continuous batching).

A ``BatchTurn`` is one request in a sequence slot: its prompt prefilled (reusing the slot's cached prefix; the slot
is chosen by ``BatchDecoder.choose``), its own sampler chain, and its output turned into events as
``completion.run_turn`` makes them (pieces through the thinking split and the stop filter, then ``Done``). The
scheduler's worker owns the ``BatchRunner``: it starts turns in free slots, steps all running turns at once, and
frees a slot when its turn ends (finished, stopped, cancelled or failed)."""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from ..batch_decoder import BatchDecoder, SequenceView
from ..errors import KimiVLError
from ..model import Stats
from ..prompt import ThinkingStreamSplitter
from ..sampling import SamplerChain
from ..tokenizer import StreamDecoder
from ..grounding import parse_actions
from .completion import STARTED, Done, Turn, prefill_progress
from .errors import APIError
from .scheduler import Job
from .stops import StopFilter

if TYPE_CHECKING:
    from ..model import KimiVL


class BatchTurn:
    def __init__(self, model: KimiVL, bd: BatchDecoder, free: list[int], job: Job):
        """Render, embed and prefill ``job.turn`` in the best free slot (taken from ``free``), then sample the first
        token."""
        clock = time.perf_counter
        turn: Turn = job.turn
        self.job, self.bd, self.emit, self.cancelled, self.done = job, bd, job.emit, job.cancelled, False
        self.stats = st = Stats()
        self.settings = turn.settings.resolved(model.info.temperature)
        self._stops = frozenset(model.tokenizer.stop_ids)
        self._text = StreamDecoder(model.tokenizer)
        self._split = ThinkingStreamSplitter() if turn.split_thinking else None
        self._stop = StopFilter(turn.stops)
        try:
            prompt = model.render_prompt(turn.messages)
        except KimiVLError as e:  # the prompt does not fit, an image cannot be decoded, ...
            raise APIError(400, str(e), "invalid_request") from None
        st.image_tokens, st.prompt_tokens, st.media = prompt.image_tokens, prompt.n_tokens, prompt.media
        self._sizes = [im.size for im in prompt.images]  # the grounding's frames
        self._answer: list[str] = []
        self.slot = bd.choose(free, model.prompt_keys(prompt)[0])
        free.remove(self.slot)
        self.chain = SamplerChain(self.settings, bd.n_vocab)
        try:
            seq = SequenceView(bd, self.slot)
            t0 = clock()
            st.restored_tokens = model.restore_prefix(prompt, seq)  # the persistent prefix cache, if any
            st.restore_seconds = clock() - t0
            t0 = clock()
            try:
                segments = model.embed_prompt(prompt)
            except KimiVLError as e:  # an image cannot be decoded, ...
                raise APIError(400, str(e), "invalid_request") from None
            st.encode_seconds = (clock() - t0 if prompt.images else 0.0) + sum(turn.encoded_ahead)
            t0, before = clock(), bd.n_evaluated
            model.store_prefix(prompt, segments, seq)
            bd.prefill(self.slot, segments, prefill_progress(turn, st, self.emit, self.cancelled))
            st.evaluated_tokens = bd.n_evaluated - before
            st.prefill_seconds = clock() - t0
            self.emit(STARTED)
            self._t0 = clock()
            self.pending = self._next(-1)
        except BaseException:
            self.close()
            free.append(self.slot)
            raise

    def _next(self, idx: int) -> int | None:
        """Sample from batch entry ``idx`` and emit what the token completes; the token to append next, or None
        when the turn has ended (its ``Done`` emitted)."""
        reason = self._sample(idx)
        if isinstance(reason, str):
            self._finish(reason)
            return None
        return reason

    def _sample(self, idx: int) -> int | str:
        """The next token, or why the turn ends."""
        st = self.stats
        if self.cancelled.is_set():
            return "stop"
        if st.generated_tokens >= self.settings.max_tokens or self.bd.n_past(self.slot) >= self.bd.n_ctx:
            return "length"
        tok = self.chain.sample(self.bd.ctx, idx)
        if tok in self._stops or self.chain.ends_turn(tok):
            return "stop"
        st.generated_tokens += 1
        for kind, piece in self._pieces(self._text.feed(tok)):
            for ev in self._stop.feed(kind, piece):
                self._send(ev)
        return "stop" if self._stop.stopped else tok

    def _pieces(self, text: str) -> list[tuple[str, str]]:
        if not text:
            return []
        return [("answer", text)] if self._split is None else [(k, t) for k, t in self._split.feed(text) if t]

    def advance(self, idx: int) -> None:
        """After a step: the next token from the step's batch entry ``idx``."""
        self.pending = self._next(idx)

    def _finish(self, reason: str) -> None:
        tail = self._pieces(self._text.flush())
        if self._split is not None:
            tail += [(k, t) for k, t in self._split.flush() if t]
        for kind, piece in tail:
            if not self._stop.stopped:
                for ev in self._stop.feed(kind, piece):
                    self._send(ev)
        for ev in self._stop.flush():
            self._send(ev)
        self.stats.decode_seconds = time.perf_counter() - self._t0
        self.stats.finish_reason = reason
        actions = parse_actions("".join(self._answer), self._sizes)
        self.emit(Done(self.stats, "stop" if self._stop.stopped else reason,
                       [dataclasses.asdict(a) for a in actions]))
        self.close()

    def _send(self, ev: tuple[str, str]) -> None:
        if ev[0] == "answer":
            self._answer.append(ev[1])
        self.emit(ev)

    def close(self) -> None:
        self.done = True
        self.chain.close()


class BatchRunner:
    """The worker's side of ``--parallel N``: N slots of one ``BatchDecoder`` on the loaded model."""

    def __init__(self, model: KimiVL, n_seq: int):
        self.model = model
        self.bd = BatchDecoder(model.decoder, n_seq)
        self.free = list(range(n_seq))
        self.running: dict[int, BatchTurn] = {}

    def start(self, job: Job) -> bool:
        """Start ``job``'s turn in a free slot (the caller checks there is one) and sample its first token; False
        when it has already ended (its events are out)."""
        t = BatchTurn(self.model, self.bd, self.free, job)
        self._keep(t)
        return not t.done

    def _keep(self, t: BatchTurn) -> None:
        if t.done:
            self.free.append(t.slot)
        else:
            self.running[t.slot] = t

    def step(self) -> list[Job]:
        """One token for every running turn, in one llama_decode; returns the jobs whose turn ended (a failure ends
        every turn of the step: each job gets the exception)."""
        turns = list(self.running.values())
        self.running.clear()
        try:
            entries = self.bd.step({t.slot: t.pending for t in turns if t.pending is not None})
            for t in turns:
                t.advance(entries[t.slot])
        except Exception as e:
            for t in turns:
                if not t.done:
                    t.close()
                    t.emit(e)
                t.done = True
        for t in turns:
            self._keep(t)
        return [t.job for t in turns if t.done]

    def close(self) -> None:
        for t in self.running.values():
            t.close()
        self.bd.close()
