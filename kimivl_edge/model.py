"""``KimiVL``: the Python API. Ties image -> preprocessing -> vision -> decoder -> sampler together.

    from kimivl_edge import KimiVL
    model = KimiVL.load("Kimi-VL-A3B-Instruct-Q4_K_M.gguf", "mmproj-Kimi-VL-A3B-Instruct-F16.gguf")
    out = model.generate([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                       {"type": "text", "text": "What is this?"}]}])
    print(out.answer)

Prompts follow the HF processor exactly: the chat template stored in the GGUF renders
``<|media_start|>image<|media_content|><|media_pad|><|media_end|>`` per image, the k-th pad becomes gh*gw/4
embedding rows (reference doc §4, §7). Tokenization is ours (tiktoken, exactly HF), not llama.cpp's.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .decoder import Decoder, DecoderSettings, ImageBlock
from .errors import KimiVLError, UsageError
from .gguf_model import ModelFileError, TextModelInfo
from .image import ImageProcessorConfig, load_image, preprocess
from .prompt import ThinkingStreamSplitter, image_parts, render, split_thinking
from .sampling import SamplerChain, SamplingSettings
from .tokenizer import StreamDecoder

VISION_BACKENDS = ("numpy", "ggml")


@dataclass
class Piece:
    """A streamed piece of output: ``kind`` is "answer" or "reasoning" (thinking models)."""

    kind: str
    text: str


@dataclass
class Stats:
    image_tokens: int = 0
    prompt_tokens: int = 0
    evaluated_tokens: int = 0   # prompt positions actually evaluated (the rest came from the KV cache)
    generated_tokens: int = 0
    encode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "stop"     # "stop" (end-of-generation token) or "length"

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.evaluated_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


@dataclass
class Generation:
    text: str                       # everything the model wrote (markers included)
    answer: str                     # the answer (after ◁/think▷ for thinking models)
    reasoning: str | None           # the thinking part, or None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "stop"     # "stop" (end-of-generation token) or "length"
    stats: Stats = field(default_factory=Stats)


def _prepare_history(messages: Sequence[dict], thinking: bool) -> list[dict]:
    """Earlier assistant turns of a thinking model keep only their answer (as the official demo does)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UsageError("each message needs 'role' and 'content'")
        if thinking and m["role"] == "assistant" and isinstance(m["content"], str):
            m = {**m, "content": split_thinking(m["content"])[1]}
        out.append(m)
    return out


def _image_source(part: dict):
    src = part.get("image", part.get("image_url"))
    if isinstance(src, dict):
        src = src.get("url")
    return src


class KimiVL:
    """A loaded Kimi-VL model: text GGUF (llama.cpp) + mmproj GGUF (numpy MoonViT, or llama.cpp's clip)."""

    def __init__(self, info: TextModelInfo, decoder: Decoder, vision, image_config: ImageProcessorConfig | None,
                 max_image_patches: int | None):
        self.info = info
        self.tokenizer = info.tokenizer
        self.decoder = decoder
        self.vision = vision
        self.image_config = image_config
        self.max_image_patches = max_image_patches
        self._image_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.image_cache_size = 16
        # progress(done, total, unit) while the vision encoder runs (vision.Progress; the CLI sets it on a terminal)
        self.encode_progress = None

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_gguf: str | Path, mmproj_gguf: str | Path | None = None, *, n_ctx: int = 4096,
             n_threads: int | None = None, kv_type: str = "f16", n_batch: int = 512, flash_attn: bool = False,
             vision_backend: str = "numpy", weight_cache: bool = False,
             max_image_patches: int | None = None, mmap: bool | None = None, repack: bool = True) -> "KimiVL":
        """Load the pair. ``max_image_patches`` caps patches per image (a speed knob; resizes like the processor).
        ``mmap``: memory-map the text GGUF (True), read it into llama.cpp's buffers (False), or None: mmap unless
        llama.cpp repacks some of its weights, which would keep both the mapped file and the repacked copy resident.
        ``repack=False``: no repacked copies (llama.cpp's CPU_REPACK buffers); the mapped file is used as it is."""
        if vision_backend not in VISION_BACKENDS:
            raise UsageError(f"unknown vision backend {vision_backend!r} (choose from {', '.join(VISION_BACKENDS)})")
        if max_image_patches is not None and max_image_patches < 4:
            raise UsageError("max_image_patches must be >= 4")
        info = TextModelInfo.read(model_gguf)
        vision = image_config = None
        if mmproj_gguf is not None:
            from .mmproj import MmprojFile

            mm = MmprojFile(mmproj_gguf)
            if mm.hparams.projection_dim != info.n_embd:
                raise ModelFileError(f"{mmproj_gguf} projects to {mm.hparams.projection_dim} but {model_gguf} has "
                                     f"n_embd {info.n_embd}: the files do not belong together")
            image_config = mm.image_processor_config()
            if vision_backend == "numpy":
                from .vision import VisionEncoder

                vision = VisionEncoder(mm, weight_cache=weight_cache, threads=n_threads)
            else:
                from .vision_ggml import GgmlVisionEncoder

                vision = GgmlVisionEncoder(mmproj_gguf, threads=n_threads)
        decoder = Decoder(model_gguf, DecoderSettings(n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type,
                                                      n_batch=n_batch, n_ubatch=n_batch, flash_attn=flash_attn,
                                                      mmap=mmap, repack=repack))
        if decoder.n_embd != info.n_embd:
            raise ModelFileError(f"{model_gguf}: llama.cpp reports n_embd {decoder.n_embd}, metadata {info.n_embd}")
        return cls(info, decoder, vision, image_config, max_image_patches)

    def close(self) -> None:
        self.decoder.close()
        if self.vision is not None and hasattr(self.vision, "close"):
            self.vision.close()

    def __enter__(self) -> "KimiVL":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Exactly the HF tokenizer: special-token strings allowed when ``special``; nothing added at the ends."""
        return self.tokenizer.encode(text) if special else self.tokenizer.encode_ordinary(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- images -----------------------------------------------------------------------------------------------
    def _require_vision(self):
        if self.vision is None:
            raise UsageError("this model was loaded without an mmproj file: images are not available")
        return self.vision

    def encode_images(self, images: Sequence[object]) -> list[np.ndarray]:
        """Projected embeddings per image, ``[n_tokens, n_embd]`` float32 (cached by pixel content)."""
        return [e for e, _ in self._embed_images(list(images))[0]]

    def _embed_images(self, images: list) -> tuple[list[tuple[np.ndarray, str]], float]:
        vision = self._require_vision()
        loaded = [load_image(i) for i in images]
        pv, grid = preprocess(loaded, self.image_config, max_patches=self.max_image_patches)
        out: list[tuple[np.ndarray, str] | None] = [None] * len(loaded)
        todo: list[int] = []
        offsets = np.concatenate([[0], np.cumsum(grid[:, 0] * grid[:, 1])])
        keys = []
        for k in range(len(loaded)):
            patch = pv[offsets[k]: offsets[k + 1]]
            key = hashlib.sha1(patch.tobytes() + grid[k].tobytes()).hexdigest()
            keys.append(key)
            if key in self._image_cache:
                self._image_cache.move_to_end(key)
                out[k] = (self._image_cache[key], key)
            else:
                todo.append(k)
        t0 = time.perf_counter()
        if todo:
            sel_pv = np.concatenate([pv[offsets[k]: offsets[k + 1]] for k in todo])
            embs = vision.encode(sel_pv, grid[todo], progress=self.encode_progress)
            for k, e in zip(todo, embs):
                out[k] = (e, keys[k])
                self._image_cache[keys[k]] = e
                while len(self._image_cache) > self.image_cache_size:
                    self._image_cache.popitem(last=False)
        return out, time.perf_counter() - t0  # type: ignore[return-value]

    # -- prompts ----------------------------------------------------------------------------------------------
    def build_prompt(self, messages: Sequence[dict], stats: Stats | None = None) -> tuple[list, Stats]:
        """Segments for the decoder: token runs and one ImageBlock per image, in textual order."""
        msgs = _prepare_history(messages, self.info.is_thinking)
        text = render(self.info.chat_template, msgs, add_generation_prompt=True)
        ids = self.tokenizer.encode(text)
        sources = [_image_source(p) for p in image_parts(msgs)]
        pad = self.tokenizer.media_pad_id
        n_pads = ids.count(pad)
        if n_pads != len(sources):
            raise UsageError(f"the prompt has {n_pads} image placeholder(s) but {len(sources)} image(s)")
        stats = stats if stats is not None else Stats()
        embs: list[tuple[np.ndarray, str]] = []
        if sources:
            embs, stats.encode_seconds = self._embed_images(sources)
        segments: list = []
        run: list[int] = []
        k = 0
        for t in ids:
            if t == pad:
                if run:
                    segments.append(run)
                    run = []
                rows, key = embs[k]
                segments.append(ImageBlock(rows, key))
                stats.image_tokens += len(rows)
                k += 1
            else:
                run.append(t)
        if run:
            segments.append(run)
        stats.prompt_tokens = sum(len(s.rows) if isinstance(s, ImageBlock) else len(s) for s in segments)
        if stats.prompt_tokens >= self.decoder.n_ctx:
            raise UsageError(f"prompt of {stats.prompt_tokens} tokens ({stats.image_tokens} image tokens) does not "
                             f"fit the context of {self.decoder.n_ctx}; raise n_ctx or set max_image_patches")
        return segments, stats

    # -- generation -------------------------------------------------------------------------------------------
    def _sampling(self, settings: SamplingSettings | None, overrides: dict) -> SamplingSettings:
        s = settings or SamplingSettings()
        if overrides:
            unknown = set(overrides) - set(SamplingSettings.__dataclass_fields__)
            if unknown:
                raise UsageError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
            s = replace(s, **overrides)
        return s.validate().resolved(self.info.temperature)

    def stream_tokens(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
                      stats: Stats | None = None, **overrides) -> Iterator[int]:
        """Generated token ids (stop token excluded); the KV cache keeps the prompt for the next turn."""
        s = self._sampling(settings, overrides)
        segments, st = self.build_prompt(messages, stats)
        before = self.decoder.n_evaluated
        t0 = time.perf_counter()
        self.decoder.prompt(segments)
        st.prefill_seconds = time.perf_counter() - t0
        st.evaluated_tokens = self.decoder.n_evaluated - before
        dec, stops, n_ctx = self.decoder, frozenset(self.tokenizer.stop_ids), self.decoder.n_ctx
        chain = SamplerChain(s, dec.n_vocab)
        sample, append, ctx, clock = chain.sample, dec.append, dec.ctx, time.perf_counter
        t0 = clock()
        try:
            for _ in range(s.max_tokens):
                if dec.n_past >= n_ctx:
                    st.finish_reason = "length"
                    return
                tok = sample(ctx)
                if tok in stops:
                    st.finish_reason = "stop"
                    return
                st.generated_tokens += 1
                yield tok
                append(tok)
                st.decode_seconds = clock() - t0
            st.finish_reason = "length"
        finally:
            st.decode_seconds = time.perf_counter() - t0
            chain.close()

    def stream(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
               stats: Stats | None = None, **overrides) -> Iterator[Piece]:
        """Text pieces as they are generated (never a broken UTF-8 character); thinking models yield
        "reasoning" pieces, then "answer" pieces."""
        dec = StreamDecoder(self.tokenizer)
        split = ThinkingStreamSplitter() if self.info.is_thinking else None
        for tok in self.stream_tokens(messages, settings, stats, **overrides):
            text = dec.feed(tok)
            if not text:
                continue
            if split is None:
                yield Piece("answer", text)
            else:
                yield from (Piece(k, t) for k, t in split.feed(text) if t)
        tail = dec.flush()
        if split is None:
            if tail:
                yield Piece("answer", tail)
        else:
            events = split.feed(tail) if tail else []
            yield from (Piece(k, t) for k, t in events + split.flush() if t)

    def generate(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
                 **overrides) -> Generation:
        stats = Stats()
        tokens = list(self.stream_tokens(messages, settings, stats, **overrides))
        text = self.tokenizer.decode(tokens)
        reasoning, answer = split_thinking(text) if self.info.is_thinking else (None, text)
        return Generation(text, answer, reasoning, tokens, stats.finish_reason, stats)

    def logits(self, messages: Sequence[dict]) -> np.ndarray:
        """Next-token logits after the generation prompt of ``messages`` ([n_vocab] float32)."""
        segments, _ = self.build_prompt(messages)
        return self.decoder.prompt(segments)


def load(model_gguf: str | Path, mmproj_gguf: str | Path | None = None, **settings) -> KimiVL:
    return KimiVL.load(model_gguf, mmproj_gguf, **settings)


__all__ = ["KimiVL", "Generation", "Piece", "Stats", "SamplingSettings", "KimiVLError", "load"]
