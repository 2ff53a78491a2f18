"""``KimiVL``: the Python API. Ties image -> preprocessing -> vision -> decoder -> sampler together.

    from kimivl_edge import KimiVL
    model = KimiVL.load("Kimi-VL-A3B-Instruct-Q4_K_M.gguf", "mmproj-Kimi-VL-A3B-Instruct-F16.gguf")
    out = model.generate([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                       {"type": "text", "text": "What is this?"}]}])
    print(out.answer, out.stats.decode_tps)

A turn runs in three steps, each a method: ``render_prompt`` (chat template -> token ids, images preprocessed:
where each image goes and how many embedding rows it takes), ``embed_prompt`` (the vision encoder, or its cache ->
the decoder's segments) and the decoder's prefill, then sampling. ``stream``/``stream_tokens`` return the turn's
output as a stream that carries its own figures (``.stats``), as mlx-lm's responses do; ``logits`` is the probe for
tools (teacher-forced logits over positions).

Prompts follow the HF processor exactly: the chat template stored in the GGUF renders
``<|media_start|>image<|media_content|><|media_pad|><|media_end|>`` per image, the k-th pad becomes gh*gw/4
embedding rows (docs/model.md §4, §7). Tokenization is ours (tiktoken, exactly HF), not llama.cpp's.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .decoder import Decoder, DecoderSettings, ImageBlock, Segment
from .errors import KimiVLError, UsageError
from .gguf_model import ModelFileError, TextModelInfo
from .image import ImageProcessorConfig, ImageSource, load_image, num_image_tokens, preprocess
from .prompt import ThinkingStreamSplitter, check_messages, image_parts, render, split_thinking
from .sampling import SamplerChain, SamplingSettings
from .tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from .vision import Progress, VisionEncoder
    from .vision_ggml import GgmlVisionEncoder

VISION_BACKENDS = ("numpy", "ggml")


@dataclass
class Piece:
    """A streamed piece of output: ``kind`` is "answer" or "reasoning" (thinking models)."""

    kind: str
    text: str


@dataclass
class Stats:
    """The figures of one turn. They travel with its output: ``Generation.stats``, ``TokenStream.stats``,
    ``PieceStream.stats``."""

    image_tokens: int = 0
    prompt_tokens: int = 0
    evaluated_tokens: int = 0   # prompt positions actually evaluated (the rest came from the KV cache)
    generated_tokens: int = 0
    encode_seconds: float = 0.0     # image embeddings: the vision encoder, or its cache
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


@dataclass(frozen=True)
class PromptImage:
    """One image of a prompt, preprocessed (docs/model.md §4) but not encoded."""

    patches: np.ndarray     # [gh*gw, 3, p, p] float32
    grid: tuple[int, int]   # (gh, gw)
    key: str                # hash of patches and grid: the key of the embedding cache and of the KV cache rows
    n_rows: int             # embedding rows (image tokens): gh*gw / merge area


@dataclass(frozen=True)
class RenderedPrompt:
    """A chat rendered for the decoder before any image is encoded: the template's token ids, with one
    ``media_pad_id`` per image, and the images in the order of their pads (docs/model.md §7.1)."""

    ids: list[int]
    images: list[PromptImage]
    media_pad_id: int

    @property
    def image_tokens(self) -> int:
        return sum(im.n_rows for im in self.images)

    @property
    def n_tokens(self) -> int:
        """Decoder positions: the ids, each pad replaced by its image's rows."""
        return len(self.ids) - len(self.images) + self.image_tokens


def _prepare_history(messages: Sequence[dict], thinking: bool) -> list[dict]:
    """Validated messages; earlier assistant turns of a thinking model keep only their answer (as the official demo
    does)."""
    check_messages(messages)
    out = []
    for m in messages:
        if thinking and m["role"] == "assistant" and isinstance(m["content"], str):
            m = {**m, "content": split_thinking(m["content"])[1]}
        out.append(m)
    return out


def _image_source(part: dict) -> ImageSource:
    src = part.get("image", part.get("image_url"))
    if isinstance(src, dict):
        src = src.get("url")
    if src is None:
        raise UsageError(f"image part {part.get('type')!r} holds no image")
    return src


def decode_pieces(ids: Iterable[int], tokenizer: Tokenizer, thinking: bool) -> Generator[Piece, None, None]:
    """Token ids -> text pieces as they complete (never a broken UTF-8 character); with ``thinking``, "reasoning"
    pieces, then "answer" pieces (docs/model.md §7.4), else only "answer" pieces."""
    dec = StreamDecoder(tokenizer)
    split = ThinkingStreamSplitter() if thinking else None
    for tok in ids:
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


class TokenStream(Iterator[int]):
    """The token ids of one turn as they are generated (the stop token excluded); the KV cache keeps the prompt for
    the next turn. Nothing runs before the first id is asked for. ``stats`` are the turn's figures: the prompt's
    once the first id is out, all of them once the stream is exhausted or closed."""

    def __init__(self, model: KimiVL, messages: Sequence[dict], settings: SamplingSettings):
        self.stats = Stats()
        self._ids = self._generate(model, messages, settings)

    def __next__(self) -> int:
        return next(self._ids)

    def close(self) -> None:
        """Stop generating (the KV cache keeps what was evaluated)."""
        self._ids.close()

    def _generate(self, model: KimiVL, messages: Sequence[dict], s: SamplingSettings) -> Generator[int, None, None]:
        st, dec, clock = self.stats, model.decoder, time.perf_counter
        prompt = model.render_prompt(messages)
        st.image_tokens, st.prompt_tokens = prompt.image_tokens, prompt.n_tokens
        t0 = clock()
        segments = model.embed_prompt(prompt)
        st.encode_seconds = clock() - t0 if prompt.images else 0.0
        before = dec.n_evaluated
        t0 = clock()
        dec.prefill(segments, progress=model.prefill_progress)
        st.prefill_seconds = clock() - t0
        st.evaluated_tokens = dec.n_evaluated - before
        stops, n_ctx = frozenset(model.tokenizer.stop_ids), dec.n_ctx
        chain = SamplerChain(s, dec.n_vocab)
        sample, append, ctx = chain.sample, dec.append, dec.ctx
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
            st.decode_seconds = clock() - t0
            chain.close()


class PieceStream(Iterator[Piece]):
    """The text pieces of one turn as they are generated (``decode_pieces`` over a ``TokenStream``); ``stats`` are
    the turn's figures, as the token stream's."""

    def __init__(self, tokens: TokenStream, tokenizer: Tokenizer, thinking: bool):
        self.tokens = tokens
        self._pieces = decode_pieces(tokens, tokenizer, thinking)

    @property
    def stats(self) -> Stats:
        return self.tokens.stats

    def __next__(self) -> Piece:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating."""
        self._pieces.close()
        self.tokens.close()


class KimiVL:
    """A loaded Kimi-VL model: text GGUF (llama.cpp) + mmproj GGUF (numpy MoonViT, or llama.cpp's clip)."""

    def __init__(self, info: TextModelInfo, decoder: Decoder, vision: VisionEncoder | GgmlVisionEncoder | None,
                 image_config: ImageProcessorConfig | None, max_image_patches: int | None):
        self.info = info
        self.tokenizer = info.tokenizer
        self.decoder = decoder
        self.vision = vision
        self.image_config = image_config
        self.max_image_patches = max_image_patches
        self._image_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.image_cache_size = 16
        # progress(done, total, unit) while the vision encoder runs (vision.Progress; the CLI sets it on a terminal)
        self.encode_progress: Progress | None = None
        # progress(done, total, "token") per evaluated chunk of a prefill (the CLI sets it on a terminal)
        self.prefill_progress: Progress | None = None

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_gguf: str | Path, mmproj_gguf: str | Path | None = None, *, n_ctx: int = 4096,
             n_threads: int | None = None, kv_type: str = "f16", n_batch: int = 512, flash_attn: bool = False,
             vision_backend: str = "numpy", weight_cache: bool = False,
             max_image_patches: int | None = None, mmap: bool | None = None, repack: bool = True,
             load_progress: Progress | None = None) -> "KimiVL":
        """Load the pair. ``max_image_patches`` caps patches per image (a speed knob; resizes like the processor).
        ``mmap``: memory-map the text GGUF (True), read it into llama.cpp's buffers (False), or None: mmap unless
        llama.cpp repacks some of its weights, which would keep both the mapped file and the repacked copy resident.
        ``repack=False``: no repacked copies (llama.cpp's CPU_REPACK buffers); the mapped file is used as it is.
        ``load_progress(done, total, "%")``: progress of llama.cpp's load of the text GGUF."""
        if vision_backend not in VISION_BACKENDS:
            raise UsageError(f"unknown vision backend {vision_backend!r} (choose from {', '.join(VISION_BACKENDS)})")
        if max_image_patches is not None and max_image_patches < 4:
            raise UsageError("max_image_patches must be >= 4")
        info = TextModelInfo.read(model_gguf)
        vision: Any = None
        image_config = None
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
                                                      mmap=mmap, repack=repack), progress=load_progress)
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
    def _require_vision(self) -> VisionEncoder | GgmlVisionEncoder:
        if self.vision is None:
            raise UsageError("this model was loaded without an mmproj file: images are not available")
        return self.vision

    def encode_images(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        """Projected embeddings per image, ``[n_tokens, n_embd]`` float32 (cached by pixel content)."""
        return self._embeddings(self._prepare_images(list(images)))

    def _prepare_images(self, images: Sequence[ImageSource]) -> list[PromptImage]:
        """Load and preprocess (docs/model.md §4), without encoding."""
        self._require_vision()
        cfg = self.image_config
        assert cfg is not None  # loaded with the vision encoder
        loaded = [load_image(i) for i in images]  # every image is readable before any pixel work
        out = []
        for img in loaded:
            patches, grid = preprocess(img, cfg, max_patches=self.max_image_patches)
            key = hashlib.sha1(patches.tobytes() + grid[0].tobytes()).hexdigest()
            gh, gw = int(grid[0, 0]), int(grid[0, 1])
            out.append(PromptImage(patches, (gh, gw), key, num_image_tokens((gh, gw), cfg.merge_kernel_size)))
        return out

    def _embeddings(self, images: Sequence[PromptImage]) -> list[np.ndarray]:
        """Embeddings of preprocessed images: from the cache, else from one vision encoder call for the rest."""
        vision = self._require_vision()
        found: dict[str, np.ndarray] = {}
        for im in images:
            if im.key in self._image_cache:
                self._image_cache.move_to_end(im.key)
                found[im.key] = self._image_cache[im.key]
        todo = list({im.key: im for im in images if im.key not in found}.values())
        if todo:
            grids = np.array([im.grid for im in todo], dtype=np.int64)
            embs = vision.encode(np.concatenate([im.patches for im in todo]), grids, progress=self.encode_progress)
            for im, e in zip(todo, embs):
                found[im.key] = self._image_cache[im.key] = e
                while len(self._image_cache) > self.image_cache_size:
                    self._image_cache.popitem(last=False)
        return [found[im.key] for im in images]

    # -- prompts ----------------------------------------------------------------------------------------------
    def render_prompt(self, messages: Sequence[dict], check_fit: bool = True) -> RenderedPrompt:
        """Chat template -> token ids -> where the images go and how many embedding rows each takes: the images are
        loaded and preprocessed, not encoded. Raises UsageError when pads and images disagree or (``check_fit``)
        the prompt does not fit the context."""
        msgs = _prepare_history(messages, self.info.is_thinking)
        ids = self.tokenizer.encode(render(self.info.chat_template, msgs, add_generation_prompt=True))
        sources = [_image_source(p) for p in image_parts(msgs)]
        pad = self.tokenizer.media_pad_id
        n_pads = ids.count(pad)
        if n_pads != len(sources):
            raise UsageError(f"the prompt has {n_pads} image placeholder(s) but {len(sources)} image(s)")
        prompt = RenderedPrompt(ids, self._prepare_images(sources) if sources else [], pad)
        if check_fit and prompt.n_tokens >= self.decoder.n_ctx:
            raise UsageError(f"prompt of {prompt.n_tokens} tokens ({prompt.image_tokens} image tokens) does not "
                             f"fit the context of {self.decoder.n_ctx}; raise n_ctx or set max_image_patches")
        return prompt

    def embed_prompt(self, prompt: RenderedPrompt) -> list[Segment]:
        """The decoder's segments for ``prompt``: its token runs and, for each pad, an ImageBlock of the image's
        embedding rows (keyed by the image's content, for KV reuse). Runs the vision encoder on the images that are
        not cached."""
        embs = self._embeddings(prompt.images) if prompt.images else []
        blocks = iter([ImageBlock(e, im.key) for im, e in zip(prompt.images, embs)])
        segments: list[Segment] = []
        run: list[int] = []
        for t in prompt.ids:
            if t == prompt.media_pad_id:
                if run:
                    segments.append(run)
                    run = []
                segments.append(next(blocks))
            else:
                run.append(t)
        if run:
            segments.append(run)
        return segments

    # -- generation -------------------------------------------------------------------------------------------
    def _sampling(self, settings: SamplingSettings | None, overrides: dict[str, Any]) -> SamplingSettings:
        s = settings or SamplingSettings()
        if overrides:
            unknown = set(overrides) - set(SamplingSettings.__dataclass_fields__)
            if unknown:
                raise UsageError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
            s = replace(s, **overrides)
        return s.validate().resolved(self.info.temperature)

    def stream_tokens(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
                      **overrides: object) -> TokenStream:
        """Generated token ids (stop token excluded) as a ``TokenStream``: iterate it; its ``stats`` are the turn's
        figures. The KV cache keeps the prompt for the next turn."""
        return TokenStream(self, messages, self._sampling(settings, overrides))

    def stream(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
               **overrides: object) -> PieceStream:
        """Text pieces as they are generated (never a broken UTF-8 character), as a ``PieceStream``; thinking models
        yield "reasoning" pieces, then "answer" pieces. Its ``stats`` are the turn's figures."""
        return PieceStream(self.stream_tokens(messages, settings, **overrides), self.tokenizer, self.info.is_thinking)

    def generate(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
                 **overrides: object) -> Generation:
        stream = self.stream_tokens(messages, settings, **overrides)
        tokens = list(stream)
        text = self.tokenizer.decode(tokens)
        reasoning, answer = split_thinking(text) if self.info.is_thinking else (None, text)
        return Generation(text, answer, reasoning, tokens, stream.stats.finish_reason, stream.stats)

    # -- probe ------------------------------------------------------------------------------------------------
    def logits(self, messages: Sequence[dict], continuation: Sequence[int] = ()) -> np.ndarray:
        """Teacher-forced next-token logits, ``[len(continuation) + 1, n_vocab]`` float32: row 0 after the
        generation prompt of ``messages``, row i + 1 after ``continuation[i]`` as well. The cached prefix of the
        prompt is reused (only what follows it is evaluated); the cache then holds prompt + continuation."""
        segments = self.embed_prompt(self.render_prompt(messages))
        cont = [int(t) for t in continuation]
        if cont:
            segments.append(cont)
        return self.decoder.prefill(segments, n_logits=len(cont) + 1)


def load(model_gguf: str | Path, mmproj_gguf: str | Path | None = None, **settings: object) -> KimiVL:
    return KimiVL.load(model_gguf, mmproj_gguf, **settings)  # type: ignore[arg-type]


__all__ = ["KimiVL", "Generation", "Piece", "Stats", "TokenStream", "PieceStream", "RenderedPrompt", "PromptImage",
           "decode_pieces", "SamplingSettings", "KimiVLError", "load"]
