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

Threads and streams: one ``KimiVL`` holds one llama.cpp context (one KV cache). Its calls are serialised by a lock
(a call from a second thread waits for the first to finish; a stream holds the lock only while it computes its next
item), so a model can be shared by threads; ``pre_encode`` (a server's encoder thread) renders and encodes images
without it, beside a decoding stream. A turn owns the KV cache from the moment it starts: a newer turn
(``stream``, ``stream_tokens``, ``generate``, ``logits``) invalidates an older unfinished stream, whose next read
raises KimiVLError instead of continuing from someone else's cache. Interrupted calls (Ctrl-C, an exception from
the encode progress callback, a stream closed early) leave the cache consistent: the next call gives what a fresh
model gives. After ``close()`` (idempotent) every call raises KimiVLError.

Message *content* is tokenized as text: special-token text a user types (``<|im_end|>``) is ordinary text, only
the template's own markers are special (HF tokenizes specials everywhere). ``allow_special_in_content=True`` is
the opt-in for raw prompts.

Prompts follow the HF processor exactly: the chat template stored in the GGUF renders
``<|media_start|>image<|media_content|><|media_pad|><|media_end|>`` per image, the k-th pad becomes gh*gw/4
embedding rows (docs/model.md §4, §7). Tokenization is ours (tiktoken, exactly HF), not llama.cpp's.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .decoder import Decoder, DecoderSettings, ImageBlock, Segment
from .errors import KimiVLError, UsageError, check_int
from .gguf_model import ModelFileError, TextModelInfo
from .grounding import Action, parse_actions
from .image import (ImageProcessorConfig, ImageSource, effective_token_limit, grid_hw, load_image, num_image_tokens,
                    preprocess)
from .media import MediaSettings, MediaStats, expand_parts
from .prompt import (THINK_CLOSE, ThinkingStreamSplitter, check_messages, image_parts, render_marking_content,
                     split_thinking)
from .sampling import SamplerChain, SamplingSettings
from .tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from .batch_decoder import SequenceView
    from .prefix_cache import PrefixCache
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
    restored_tokens: int = 0    # prompt positions restored from the persistent prefix cache (prefix_cache.py)
    restore_seconds: float = 0.0
    generated_tokens: int = 0
    encode_seconds: float = 0.0     # image embeddings: the vision encoder, or its cache
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "stop"     # "stop" (end-of-generation token) or "length"
    media: MediaStats = field(default_factory=MediaStats)  # video frames / PDF pages expanded into images

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
    reasoning_unfinished: bool = False  # ◁think▷ opened but never closed (cut by max_tokens: finish_reason "length")
    grounding: list[Action] = field(default_factory=list)  # actions/points/boxes of the answer, original pixels


@dataclass(frozen=True)
class PromptImage:
    """One image of a prompt, preprocessed (docs/model.md §4) but not encoded."""

    patches: np.ndarray     # [gh*gw, 3, p, p] float32
    grid: tuple[int, int]   # (gh, gw)
    key: str                # hash of patches and grid: the key of the embedding cache and of the KV cache rows
    n_rows: int             # embedding rows (image tokens): gh*gw / merge area
    size: tuple[int, int] = (0, 0)  # (w, h) of the image as given, before the processor's resize and padding


@dataclass(frozen=True)
class RenderedPrompt:
    """A chat rendered for the decoder before any image is encoded: the template's token ids, with one
    ``media_pad_id`` per image, and the images in the order of their pads (docs/model.md §7.1)."""

    ids: list[int]
    images: list[PromptImage]
    media_pad_id: int
    media: MediaStats = field(default_factory=MediaStats)

    @property
    def image_tokens(self) -> int:
        return sum(im.n_rows for im in self.images)

    @property
    def n_tokens(self) -> int:
        """Decoder positions: the ids, each pad replaced by its image's rows."""
        return len(self.ids) - len(self.images) + self.image_tokens


def _prepare_history(messages: Sequence[dict], thinking: bool) -> tuple[list[dict], str]:
    """Validated messages and the assistant prefill: a chat that ends with an assistant message continues it (the
    text is the start of the answer, as llama-server's assistant prefill and HF's ``continue_final_message``), so
    that message is returned apart. Earlier assistant turns of a thinking model keep only their answer (as the
    official demo does)."""
    check_messages(messages)
    prefill = ""
    if messages[-1]["role"] == "assistant":
        if not isinstance(messages[-1]["content"], str):
            raise UsageError("a final assistant message (the start of the answer to continue) must be a string")
        prefill, messages = messages[-1]["content"], messages[:-1]
        if not messages:
            raise UsageError("a chat cannot be only an assistant message")
    out = []
    for m in messages:
        if thinking and m["role"] == "assistant" and isinstance(m["content"], str):
            m = {**m, "content": split_thinking(m["content"])[1]}
        out.append(m)
    return out, prefill


def _image_source(part: dict) -> ImageSource:
    src = part.get("image", part.get("image_url"))
    if isinstance(src, dict):
        src = src.get("url")
    if src is None:
        raise UsageError(f"image part {part.get('type')!r} holds no image")
    return src


def decode_pieces(ids: Iterable[int], tokenizer: Tokenizer, thinking: bool) -> Generator[Piece, None, None]:
    """Token ids -> text pieces as they complete (never a broken UTF-8 character); with ``thinking``, "reasoning"
    pieces, then "answer" pieces (docs/model.md §7.4: split as ``split_thinking`` splits the whole text), else only
    "answer" pieces."""
    return _pieces(ids, tokenizer, ThinkingStreamSplitter() if thinking else None)


def _pieces(ids: Iterable[int], tokenizer: Tokenizer,
            split: ThinkingStreamSplitter | None) -> Generator[Piece, None, None]:
    dec = StreamDecoder(tokenizer)
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
    once the first id is out, all of them once the stream is exhausted or closed.

    Each read holds the model's lock while it computes. The stream owns the model's KV cache from its creation
    until it ends: after a newer turn on the same model (another stream, ``generate``, ``logits``) or ``close()``,
    reading it raises KimiVLError. ``close()`` stops it early (a server cancelling a request); the cache stays
    consistent (it keeps what was evaluated) and the model is ready for the next turn."""

    def __init__(self, model: KimiVL, messages: Sequence[dict], settings: SamplingSettings):
        self.stats = Stats()
        self._model = model
        self.image_sizes: list[tuple[int, int]] = []  # original (w, h) of the prompt's images, once rendered
        self._ids = self._generate(model, messages, settings)
        self._done = False

    def __next__(self) -> int:
        m = self._model
        with m._lock:
            if self._done:
                raise StopIteration
            if m._closed or m._turn is not self:
                self._finish()
                raise KimiVLError("this stream can no longer be read: " + (
                    "the model is closed" if m._closed else
                    "a newer call on the same model (stream, generate or logits) took over its KV cache"))
            try:
                return next(self._ids)
            except BaseException:
                self._finish()
                raise

    def close(self) -> None:
        """Stop generating (the KV cache keeps what was evaluated); idempotent, also on a closed model."""
        with self._model._lock:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._ids.close()
        if self._model._turn is self:
            self._model._turn = None

    def _generate(self, model: KimiVL, messages: Sequence[dict], s: SamplingSettings) -> Generator[int, None, None]:
        st, dec, clock = self.stats, model.decoder, time.perf_counter
        prompt = model.render_prompt(messages)
        st.image_tokens, st.prompt_tokens, st.media = prompt.image_tokens, prompt.n_tokens, prompt.media
        self.image_sizes = [im.size for im in prompt.images]
        t0 = clock()
        st.restored_tokens = model.restore_prefix(prompt)
        st.restore_seconds = clock() - t0
        t0 = clock()
        segments = model.embed_prompt(prompt)
        st.encode_seconds = clock() - t0 if prompt.images else 0.0
        before = dec.n_evaluated
        t0 = clock()
        model.store_prefix(prompt, segments)
        dec.prefill(segments, progress=model.prefill_progress)
        st.prefill_seconds = clock() - t0
        st.evaluated_tokens = dec.n_evaluated - before
        stops, n_ctx = frozenset(model.tokenizer.stop_ids), dec.n_ctx
        chain = SamplerChain(s, dec.n_vocab)
        sample, ends, append, ctx = chain.sample, chain.ends_turn, dec.append, dec.ctx
        t0 = clock()
        try:
            for _ in range(s.max_tokens):
                if dec.n_past >= n_ctx:
                    st.finish_reason = "length"
                    return
                tok = sample(ctx)
                if tok in stops or ends(tok):
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
        self._split = ThinkingStreamSplitter() if thinking else None
        self._pieces = _pieces(tokens, tokenizer, self._split)

    @property
    def stats(self) -> Stats:
        return self.tokens.stats

    @property
    def reasoning_unfinished(self) -> bool:
        """As ``Generation.reasoning_unfinished``: ◁think▷ opened and, so far, never closed."""
        return self._split is not None and self._split.reasoning_unfinished

    def __next__(self) -> Piece:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating."""
        self._pieces.close()
        self.tokens.close()


class KimiVL:
    """A loaded Kimi-VL model: text GGUF (llama.cpp) + mmproj GGUF (numpy MoonViT, or llama.cpp's clip)."""

    def __init__(self, info: TextModelInfo, decoder: Decoder, vision: VisionEncoder | GgmlVisionEncoder | None,
                 image_config: ImageProcessorConfig | None, max_image_patches: int | None, *,
                 exif_transpose: bool = True, allow_special_in_content: bool = False,
                 prefix_cache: PrefixCache | None = None, prefix_identity: str = ""):
        self.info = info
        self.tokenizer = info.tokenizer
        self.decoder = decoder
        self.vision = vision
        self.image_config = image_config
        self.max_image_patches = max_image_patches
        self.exif_transpose = exif_transpose
        self.allow_special_in_content = allow_special_in_content
        self._image_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.image_cache_size = 16
        # progress(done, total, unit) while the vision encoder runs (vision.Progress; the CLI sets it on a terminal)
        self.encode_progress: Progress | None = None
        # progress(done, total, "token") per evaluated chunk of a prefill (the CLI sets it on a terminal)
        self.prefill_progress: Progress | None = None
        # how video and document parts become images (media.MediaSettings: frames, pages, budgets)
        self.media_settings = MediaSettings()
        self._lock = threading.RLock()     # serialises every call (see the module docstring)
        self._vision_lock = threading.Lock()  # the vision encoder's calls (``pre_encode`` runs it without _lock)
        self._turn: TokenStream | None = None  # the stream that owns the KV cache
        self._closed = False
        self.prefix_cache = prefix_cache      # the persistent prefix cache, or None
        self._prefix_identity = prefix_identity  # prefix_cache.model_identity of the files and settings

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the model's lock for one call; a closed model raises KimiVLError."""
        with self._lock:
            if self._closed:
                raise KimiVLError("the model is closed")
            yield

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_gguf: str | Path, mmproj_gguf: str | Path | None = None, *, n_ctx: int = 4096,
             n_threads: int | None = None, kv_type: str = "f16", n_batch: int = 512, flash_attn: bool = False,
             vision_backend: str = "numpy", weight_cache: bool = False,
             max_image_patches: int | None = None, mmap: bool | None = None, repack: bool = True,
             exif_transpose: bool = True, allow_special_in_content: bool = False,
             load_progress: Progress | None = None, prefix_cache: PrefixCache | None = None,
             eval_callback: object = None) -> "KimiVL":
        """Load the pair. ``max_image_patches`` caps patches per image (a speed knob; resizes like the processor).
        ``mmap``: memory-map the text GGUF (True), read it into llama.cpp's buffers (False), or None: mmap unless
        llama.cpp repacks some of its weights, which would keep both the mapped file and the repacked copy resident.
        ``repack=False``: no repacked copies (llama.cpp's CPU_REPACK buffers); the mapped file is used as it is.
        ``exif_transpose``: apply an image's EXIF orientation (default, as transformers' ``load_image``).
        ``allow_special_in_content``: tokenize special-token text inside message content as special tokens (HF's
        behaviour, for trusted raw prompts); by default it is ordinary text, so user input cannot forge turns.
        A prompt that does not fit ``n_ctx`` is refused before any image is encoded; the error names n_ctx and
        max_image_patches (Thinking-2506 allows 16384 patches = 4096 image tokens per image, more than the
        default n_ctx). ``load_progress(done, total, "%")``: progress of llama.cpp's load of the text GGUF.
        ``prefix_cache``: a ``PrefixCache(directory, max_bytes)`` keeps the decoder state after a prompt's images on
        disk, so that a later prompt starting with the same images and text, in this or another process, skips
        their encoding and prefill (README "Prefix cache"). Default None: the API writes nothing to disk unless
        asked (the CLI verbs use one by default). ``eval_callback``: llama.cpp's graph eval callback for the
        decoder (``Decoder``; the imatrix collector)."""
        if vision_backend not in VISION_BACKENDS:
            raise UsageError(f"unknown vision backend {vision_backend!r} (choose from {', '.join(VISION_BACKENDS)})")
        if max_image_patches is not None:
            check_int("max_image_patches", max_image_patches, 4)
        for name, flag in (("weight_cache", weight_cache), ("exif_transpose", exif_transpose),
                           ("allow_special_in_content", allow_special_in_content)):
            if not isinstance(flag, bool):
                raise UsageError(f"{name} must be True or False, got {flag!r}")
        settings = DecoderSettings(n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type, n_batch=n_batch,
                                   n_ubatch=n_batch, flash_attn=flash_attn, mmap=mmap, repack=repack)
        info = TextModelInfo.read(model_gguf, tensors=True)  # the decoder's guard too, in the same parse
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
        decoder = Decoder(model_gguf, settings, progress=load_progress, eval_callback=eval_callback,
                          checked=info.tensor_types)
        if decoder.n_embd != info.n_embd:
            raise ModelFileError(f"{model_gguf}: llama.cpp reports n_embd {decoder.n_embd}, metadata {info.n_embd}")
        identity = ""
        if prefix_cache is not None:
            from .prefix_cache import PrefixCache, model_identity

            if not isinstance(prefix_cache, PrefixCache):
                raise UsageError(f"prefix_cache must be a PrefixCache or None, got {prefix_cache!r}")
            identity = model_identity(model_gguf, mmproj_gguf, vision_backend, decoder.state_settings())
        return cls(info, decoder, vision, image_config, max_image_patches, exif_transpose=exif_transpose,
                   allow_special_in_content=allow_special_in_content, prefix_cache=prefix_cache,
                   prefix_identity=identity)

    def close(self) -> None:
        """Free the model; idempotent. Waits for a running call; every later call raises KimiVLError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._turn = None
            self._image_cache.clear()
            self.decoder.close()
            if self.vision is not None and hasattr(self.vision, "close"):
                with self._vision_lock:  # a pre_encode may be running
                    self.vision.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "KimiVL":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Exactly the HF tokenizer: special-token strings allowed when ``special``; nothing added at the ends.
        (Prompts built from messages tokenize their content with ``special=False``: see ``render_prompt``.)"""
        with self._locked():
            return self.tokenizer.encode(text) if special else self.tokenizer.encode_ordinary(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        with self._locked():
            return self.tokenizer.decode(list(ids))

    # -- images -----------------------------------------------------------------------------------------------
    def _require_vision(self) -> VisionEncoder | GgmlVisionEncoder:
        if self.vision is None:
            raise UsageError("this model was loaded without an mmproj file: images are not available")
        return self.vision

    def encode_images(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        """Projected embeddings per image, ``[n_tokens, n_embd]`` float32 (cached by pixel content)."""
        with self._locked():
            return self._embeddings(self._preprocess(self._load_images(list(images))))

    def _load_images(self, images: Sequence[ImageSource]) -> list[tuple[Image.Image, tuple[int, int]]]:
        """Each image decoded (every one readable before any pixel work) with its patch grid (docs/model.md §4)."""
        self._require_vision()
        cfg = self.image_config
        assert cfg is not None  # loaded with the vision encoder
        loaded = [load_image(i, self.exif_transpose) for i in images]
        return [(img, grid_hw(*img.size, cfg, self.max_image_patches)) for img in loaded]

    def _preprocess(self, images: Sequence[tuple[Image.Image, tuple[int, int]]],
                    sizes: Sequence[tuple[int, int] | None] = ()) -> list[PromptImage]:
        """Preprocess (docs/model.md §4), without encoding. ``sizes``: the original (w, h) an image stands for when
        it was handed over resized (a video frame: the video's size), else None."""
        cfg = self.image_config
        out: list[PromptImage] = []
        for k, (img, _) in enumerate(images):
            assert cfg is not None  # images were loaded: the model has its vision encoder
            patches, grid = preprocess(img, cfg, max_patches=self.max_image_patches, exif_transpose=False)
            key = hashlib.sha1(patches.tobytes() + grid[0].tobytes()).hexdigest()
            gh, gw = int(grid[0, 0]), int(grid[0, 1])
            given = sizes[k] if k < len(sizes) else None
            size = (int(given[0]), int(given[1])) if given else img.size
            out.append(PromptImage(patches, (gh, gw), key, num_image_tokens((gh, gw), cfg.merge_kernel_size),
                                   size))
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
            for im, e in zip(todo, self._encode(vision, todo)):
                found[im.key] = e
                self._cache_put(im.key, e)
        return [found[im.key] for im in images]

    def _encode(self, vision: VisionEncoder | GgmlVisionEncoder, images: Sequence[PromptImage]) -> list[np.ndarray]:
        grids = np.array([im.grid for im in images], dtype=np.int64)
        with self._vision_lock:
            embs = vision.encode(np.concatenate([im.patches for im in images]), grids, progress=self.encode_progress)
        if not all(np.isfinite(e).all() for e in embs):
            raise KimiVLError("the vision encoder produced non-finite values (NaN or Inf): the mmproj file is "
                              "corrupt or does not belong to this model")
        return embs

    def _cache_put(self, key: str, emb: np.ndarray) -> None:
        self._image_cache[key] = emb
        while len(self._image_cache) > self.image_cache_size:
            self._image_cache.popitem(last=False)

    def pre_encode(self, messages: Sequence[dict]) -> int:
        """Put the embeddings of ``messages``' images in the cache, holding the model's lock only to read and fill
        the cache: rendering and the vision encoder (neither touches llama.cpp) run beside another thread's decode,
        so a server can encode a queued request's images while the current one generates; the queued turn then
        finds them cached. Returns the number of images encoded. Raises what ``render_prompt`` raises."""
        with self._locked():
            vision = self._require_vision()
        prompt = self._render(messages)
        with self._locked():
            todo = list({im.key: im for im in prompt.images if im.key not in self._image_cache}.values())
        if not todo:
            return 0
        embs = self._encode(vision, todo)
        with self._locked():
            for im, e in zip(todo, embs):
                self._cache_put(im.key, e)
        return len(todo)

    # -- prompts ----------------------------------------------------------------------------------------------
    def render_prompt(self, messages: Sequence[dict], check_fit: bool = True) -> RenderedPrompt:
        """Chat template -> token ids -> where the images go and how many embedding rows each takes: the images are
        loaded and preprocessed, not encoded. Message content is tokenized as plain text (special-token text in it
        is not special) unless the model was loaded with ``allow_special_in_content``. Raises UsageError when pads
        and images disagree, or (``check_fit``) when the prompt does not fit the context: counted from the image
        sizes, before any pixel is preprocessed or encoded."""
        with self._locked():
            return self._render(messages, check_fit)

    def _render(self, messages: Sequence[dict], check_fit: bool = True) -> RenderedPrompt:
        """``render_prompt`` without the lock: it reads only the model's settings, never llama.cpp."""
        messages, media = expand_parts(messages, self.media_settings, self.image_config, self.max_image_patches,
                                       self.decoder.n_ctx)
        msgs, prefill = _prepare_history(messages, self.info.is_thinking)
        text, content = render_marking_content(self.info.chat_template, msgs, add_generation_prompt=True)
        if prefill:
            content.append((len(text), len(text) + len(prefill)))
            text += prefill
        ids = self.tokenizer.encode_except(text, [] if self.allow_special_in_content else content)
        sources = [_image_source(p) for p in image_parts(msgs)]
        pad = self.tokenizer.media_pad_id
        n_pads = ids.count(pad)
        if n_pads != len(sources):
            raise UsageError(f"the prompt has {n_pads} image placeholder(s) but {len(sources)} image(s)")
        loaded = self._load_images(sources) if sources else []
        if check_fit:
            self._check_fit(len(ids) - len(sources), [g for _, g in loaded])
        sizes = [p.get("source_size") for p in image_parts(msgs)]
        return RenderedPrompt(ids, self._preprocess(loaded, sizes), pad, media)

    def _check_fit(self, n_text: int, grids: Sequence[tuple[int, int]]) -> None:
        """The prompt must leave one position for the answer; the message says what to change."""
        n_ctx = self.decoder.n_ctx
        n_image = 0
        for k, grid in enumerate(grids):
            assert self.image_config is not None
            n_image += num_image_tokens(grid, self.image_config.merge_kernel_size)
            if n_text + n_image >= n_ctx:
                limit = effective_token_limit(self.image_config, self.max_image_patches)
                raise UsageError(
                    f"the prompt does not fit the context of {n_ctx} tokens: {n_text} text tokens and image "
                    f"{k + 1} of {len(grids)} reach {n_text + n_image}; load with a larger n_ctx (--ctx) or a smaller "
                    f"max_image_patches (--max-image-patches, now {limit} patches = up to {limit // 4} tokens "
                    f"per image)")
        if n_text >= n_ctx:
            raise UsageError(f"the prompt of {n_text} tokens does not fit the context of {n_ctx} tokens; load "
                             "with a larger n_ctx (--ctx)")

    def embed_prompt(self, prompt: RenderedPrompt) -> list[Segment]:
        """The decoder's segments for ``prompt``: its token runs and, for each pad, an ImageBlock of the image's
        embedding rows (keyed by the image's content, for KV reuse). Runs the vision encoder on the images that are
        not cached."""
        with self._locked():
            return self._segments(prompt)

    def _segments(self, prompt: RenderedPrompt) -> list[Segment]:
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

    # -- persistent prefix cache (prefix_cache.py) -------------------------------------------------------------
    @staticmethod
    def prompt_keys(prompt: RenderedPrompt) -> tuple[list, int]:
        """The decoder keys of ``prompt`` before its images are embedded (``Decoder.segment_keys`` of its segments),
        and where its last image ends (0 without images)."""
        keys: list = []
        images = iter(prompt.images)
        end = 0
        for t in prompt.ids:
            if t == prompt.media_pad_id:
                im = next(images)
                keys.extend((im.key, i) for i in range(im.n_rows))
                end = len(keys)
            else:
                keys.append(t)
        return keys, end

    @classmethod
    def _image_prefix(cls, prompt: RenderedPrompt) -> list:
        """The decoder keys of ``prompt`` up to the end of its last image ([] without images)."""
        keys, end = cls.prompt_keys(prompt)
        return keys[:end]

    def restore_prefix(self, prompt: RenderedPrompt, dec: Decoder | SequenceView | None = None) -> int:
        """(The persistent prefix cache's two steps, used by each turn and by the server's ``--parallel`` slots.)
        Restore the state after the prompt's images from the prefix cache when the KV cache (of ``dec``: the
        decoder, or a ``--parallel`` slot) does not already hold it; their embeddings go to the image cache.
        Returns the positions restored."""
        cache, dec = self.prefix_cache, dec or self.decoder
        prefix = self._image_prefix(prompt) if cache is not None else []
        if cache is None or not prefix or dec.cached_prefix(prefix) == len(prefix):
            return 0
        entry = cache.load(self._prefix_identity, prefix)
        if entry is None:
            return 0
        if not dec.load_state(entry.state, prefix):
            cache.reject(self._prefix_identity, prefix, "llama.cpp refused the state")
            return 0
        for key, emb in entry.embeddings.items():
            self._image_cache[key] = emb
        return len(prefix)

    def store_prefix(self, prompt: RenderedPrompt, segments: list[Segment],
                     dec: Decoder | SequenceView | None = None) -> None:
        """Prefill ``dec`` (the decoder, or a ``--parallel`` slot) up to the end of the prompt's last image and
        store that state, unless the cache holds it, or the KV cache holds it followed by more (a conversation
        going on: storing would cut and re-evaluate the rest)."""
        cache, dec = self.prefix_cache, dec or self.decoder
        prefix = self._image_prefix(prompt) if cache is not None else []
        if cache is None or not prefix or not cache.writable or cache.contains(self._prefix_identity, prefix):
            return
        if dec.cached_prefix(prefix) == len(prefix) < dec.n_past:
            return
        from .prefix_cache import Entry

        last = max(i for i, seg in enumerate(segments) if isinstance(seg, ImageBlock))
        dec.prefill(segments[: last + 1])
        embs = {seg.key: seg.rows for seg in segments[: last + 1] if isinstance(seg, ImageBlock)}
        cache.store(self._prefix_identity, Entry(prefix, dec.save_state(), embs))  # type: ignore[arg-type]

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
        figures. The KV cache keeps the prompt for the next turn. The new stream takes over the KV cache: an older
        unfinished stream of this model raises KimiVLError when next read."""
        with self._locked():
            stream = TokenStream(self, messages, self._sampling(settings, overrides))
            self._turn = stream
            return stream

    def stream(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
               **overrides: object) -> PieceStream:
        """Text pieces as they are generated (never a broken UTF-8 character), as a ``PieceStream``; thinking models
        yield "reasoning" pieces, then "answer" pieces. Its ``stats`` are the turn's figures."""
        return PieceStream(self.stream_tokens(messages, settings, **overrides), self.tokenizer, self.info.is_thinking)

    def generate(self, messages: Sequence[dict], settings: SamplingSettings | None = None,
                 **overrides: object) -> Generation:
        """The whole turn at once (holding the lock throughout): text, answer and reasoning split as ``stream``
        splits them, ``reasoning_unfinished`` when ◁think▷ never closed."""
        with self._locked():
            stream = self.stream_tokens(messages, settings, **overrides)
            tokens = list(stream)
        text = self.tokenizer.decode(tokens)
        reasoning, answer = split_thinking(text) if self.info.is_thinking else (None, text)
        unfinished = reasoning is not None and THINK_CLOSE not in text
        return Generation(text, answer, reasoning, tokens, stream.stats.finish_reason, stream.stats, unfinished,
                          parse_actions(answer, stream.image_sizes))

    # -- probe ------------------------------------------------------------------------------------------------
    def logits(self, messages: Sequence[dict], continuation: Sequence[int] = ()) -> np.ndarray:
        """Teacher-forced next-token logits, ``[len(continuation) + 1, n_vocab]`` float32: row 0 after the
        generation prompt of ``messages``, row i + 1 after ``continuation[i]`` as well. The cached prefix of the
        prompt is reused (only what follows it is evaluated); the cache then holds prompt + continuation."""
        with self._locked():
            self._turn = None  # the cache changes: an unfinished stream cannot continue
            prompt = self.render_prompt(messages)
            self.restore_prefix(prompt)
            segments = self.embed_prompt(prompt)
            self.store_prefix(prompt, segments)
            cont = [int(t) for t in continuation]
            if cont:
                segments.append(cont)
            return self.decoder.prefill(segments, n_logits=len(cont) + 1)


def load(model_gguf: str | Path, mmproj_gguf: str | Path | None = None, **settings: object) -> KimiVL:
    return KimiVL.load(model_gguf, mmproj_gguf, **settings)  # type: ignore[arg-type]


__all__ = ["KimiVL", "Generation", "Piece", "Stats", "TokenStream", "PieceStream", "RenderedPrompt", "PromptImage",
           "decode_pieces", "SamplingSettings", "KimiVLError", "load"]
