"""Sampling settings and llama.cpp's C sampler chain built from them.

Defaults follow the model card (docs/model.md §1): the temperature comes from the GGUF (``general.sampling.temp``:
Instruct 0.2, Thinking 0.8); ``temperature=0`` is greedy. The other filters are off by default, as in HF's
generate(): top-p 1, top-k 0, min-p 0, no repetition penalty.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

from .errors import UsageError, check_float, check_int


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float | None = None  # None: the model's recommended temperature
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    max_tokens: int = 512
    grammar: str | None = None  # GBNF: only output the grammar admits (llama.cpp's grammar sampler)

    def validate(self) -> "SamplingSettings":
        """Every number finite and in range (NaN would make llama.cpp's samplers emit garbage), else UsageError."""
        if self.temperature is not None:
            check_float("temperature", self.temperature, 0.0)
        check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_int("top_k", self.top_k, 0)
        check_float("min_p", self.min_p, 0.0, 1.0)
        check_float("repeat_penalty", self.repeat_penalty, 0.0, lo_open=True)
        check_int("repeat_last_n", self.repeat_last_n, 0)
        check_int("seed", self.seed, -(2**63))
        check_int("max_tokens", self.max_tokens, 1)
        return self

    def resolved(self, default_temperature: float) -> "SamplingSettings":
        t = default_temperature if self.temperature is None else self.temperature
        return replace(self, temperature=float(t))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplerChain:
    """A llama.cpp sampler chain (penalties -> top-k -> top-p -> min-p -> temperature -> dist, or greedy)."""

    def __init__(self, s: SamplingSettings, n_vocab: int = 0):
        """``n_vocab``: the model's vocabulary size (llama.cpp's penalties sampler records it)."""
        import llama_cpp as lc

        self._lc = lc
        self._grammar = s.grammar
        self._grammar_vocab = None  # set once the grammar sampler runs (ends_turn)
        params = lc.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = lc.llama_sampler_chain_init(params)
        add = lambda smpl: lc.llama_sampler_chain_add(self._chain, smpl)  # noqa: E731
        if s.repeat_penalty != 1.0:
            add(lc.llama_sampler_init_penalties(n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
        if s.greedy:
            add(lc.llama_sampler_init_greedy())
            return
        if s.top_k > 0:
            add(lc.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(lc.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            add(lc.llama_sampler_init_min_p(s.min_p, 1))
        add(lc.llama_sampler_init_temp(s.temperature))
        add(lc.llama_sampler_init_dist(ctypes.c_uint32(s.seed & 0xFFFFFFFF).value))

    def sample(self, ctx, idx: int = -1) -> int:
        """Sample from the logits of the last evaluated position, or of batch entry ``idx`` (and accept the token
        into the chain)."""
        if self._grammar is not None:
            self._put_grammar_first(ctx, self._grammar)
        return int(self._lc.llama_sampler_sample(self._chain, ctx, idx))

    def ends_turn(self, tok: int) -> bool:
        """With a grammar, whether ``tok`` is one of llama.cpp's end-of-generation tokens (``llama_vocab_is_eog``:
        the model's stop ids, and also e.g. ``[EOT]`` and ``[PAD]``, which llama.cpp takes for a FIM pad). The
        grammar sampler admits them, and only them, once the grammar is complete, so the model may end a turn with
        one that is not among its own stop ids: it ends the turn all the same, and its text is never output."""
        return self._grammar_vocab is not None and bool(self._lc.llama_vocab_is_eog(self._grammar_vocab, tok))

    def _put_grammar_first(self, ctx, gbnf: str) -> None:
        """Wrap the chain in one that runs the grammar sampler first (it needs the vocabulary: ``ctx``'s model)."""
        lc = self._lc
        self._grammar_vocab = vocab = lc.llama_model_get_vocab(lc.llama_get_model(ctx))
        grammar = lc.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not grammar:
            raise UsageError("llama.cpp could not parse the grammar")
        params = lc.llama_sampler_chain_default_params()
        params.no_perf = True
        outer = lc.llama_sampler_chain_init(params)
        lc.llama_sampler_chain_add(outer, grammar)
        lc.llama_sampler_chain_add(outer, self._chain)  # the outer chain owns (and frees) the inner one
        self._chain, self._grammar = outer, None

    def close(self) -> None:
        if self._chain is not None:
            self._lc.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
