"""One chat turn: the validated request -> a ``Turn`` (messages with image, video and PDF bytes, sampling settings,
stops), run on the worker thread -> events (``(kind, text)`` pieces, then ``Done``) -> OpenAI response objects.

Videos (``video_url``) and PDFs (``file``) become the runtime's video and document parts; the runtime expands
them into frames and pages (kimivl_edge.media) under the model's ``media_settings``. The answer's grounding
actions (kimivl_edge.grounding) travel in an extra field OpenAI clients ignore: ``message.grounding``, and
``delta.grounding`` in the stream's chunk that carries the finish_reason; only when the answer has any."""
from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import KimiVLError, UsageError
from ..grounding import parse_actions
from ..model import Stats, decode_pieces
from ..sampling import SamplingSettings
from .config import ServerConfig
from .errors import APIError, invalid_field
from .grammar import response_grammar
from .media import document_bytes, image_bytes, video_bytes
from .schemas import ChatRequest, ContentPart, Message
from .scheduler import Cancelled, Emit
from .stops import StopFilter

if TYPE_CHECKING:
    from ..model import KimiVL


@dataclass(frozen=True)
class ModelCard:
    """What the event loop may know of the loaded model without touching it."""

    id: str
    n_ctx: int
    thinking: bool
    vision: bool

    @classmethod
    def of(cls, model: KimiVL, model_id: str) -> "ModelCard":
        return cls(model_id, model.decoder.n_ctx, model.info.is_thinking, model.vision is not None)

    def entry(self, created: int) -> dict:
        return {"id": self.id, "object": "model", "created": created, "owned_by": "kimivl-edge",
                "max_model_len": self.n_ctx, "input_modalities": ["text", "image"] if self.vision else ["text"]}


@dataclass(frozen=True)
class Turn:
    messages: list[dict]
    settings: SamplingSettings
    stops: list[str]
    split_thinking: bool
    return_progress: bool = False
    encoded_ahead: list[float] = field(default_factory=list)  # seconds pre_encode spent encoding this turn's media

    def pre_encode(self, model: KimiVL) -> None:
        """The encoder thread's ``prepare`` step (``KimiVL.pre_encode``); when it encodes any image, its time
        (rendering and the vision encoder) is the turn's encode time, as the turn itself then finds them cached."""
        t0 = time.perf_counter()
        if model.pre_encode(self.messages):
            self.encoded_ahead.append(time.perf_counter() - t0)


@dataclass(frozen=True)
class Done:
    stats: Stats
    finish_reason: str
    grounding: list[dict] = field(default_factory=list)  # the answer's actions, in pixels of their image


@dataclass(frozen=True)
class PromptProgress:
    """llama-server's ``prompt_progress``: of the prompt's ``total`` positions, ``cache`` came from the KV cache and
    ``processed`` (cache included) are in it now, ``time_ms`` after the prompt's evaluation started."""

    total: int
    cache: int
    processed: int
    time_ms: float


def prefill_progress(turn: Turn, stats: Stats, emit: Emit, cancelled: threading.Event
                     ) -> Callable[[int, int, str], None]:
    """The turn's prefill progress callback (``done`` of ``total`` evaluated positions, after each chunk): it stops
    the prefill of a cancelled turn (raises Cancelled; the decoder keeps what it evaluated, consistently) and, when
    the turn asked for them, emits PromptProgress events. ``stats.prompt_tokens`` is the whole prompt's size (set
    before the prefill starts)."""
    t0 = time.perf_counter()

    def report(done: int, total: int, unit: str) -> None:
        if cancelled.is_set():
            raise Cancelled
        if turn.return_progress:
            cache = stats.prompt_tokens - total
            emit(PromptProgress(stats.prompt_tokens, cache, cache + done,
                                round(1e3 * (time.perf_counter() - t0), 1)))

    return report


STARTED = "started"
"""The event sent once the prompt is evaluated and the first token is out: the request can no longer fail as a bad
request, so a stream's headers go out even while the first piece is held back (a thinking model's output before any
marker is held until a marker decides it, docs/model.md §7.4)."""


def prepare_turn(req: ChatRequest, cfg: ServerConfig, card: ModelCard) -> Turn:
    """Checks the request against the model and the limits and reads its images (blocking: http(s) fetches)."""
    if req.model is not None and req.model != card.id:
        raise APIError(404, f"model {req.model!r} not found (this server serves {card.id!r})", "model_not_found",
                       "model")
    if req.n != 1:
        raise invalid_field("only n=1 is supported", "n")
    max_tokens = req.max_completion_tokens or req.max_tokens or card.n_ctx
    if max_tokens > card.n_ctx:
        raise invalid_field(f"max_tokens {max_tokens} exceeds the context of {card.n_ctx}", "max_tokens")
    types = [p.type for m in req.messages if isinstance(m.content, list) for p in m.content]
    n_images = types.count("image_url")
    if n_images > cfg.max_images:
        raise APIError(413, f"{n_images} images exceed the limit of {cfg.max_images} per request (--max-images)",
                       "too_many_images", "messages")
    if not card.vision and any(t in MEDIA_PARTS for t in types):
        raise invalid_field("this model was loaded without --mmproj: images, videos and PDFs are not available",
                            "messages")
    try:
        settings = SamplingSettings(temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                                    seed=secrets.randbits(32) if req.seed is None else req.seed,
                                    grammar=response_grammar(req.response_format)).validate()
    except UsageError as e:
        raise invalid_field(str(e)) from None
    split = (req.reasoning_format or cfg.reasoning_format) == "deepseek" and card.thinking
    return Turn([_message(m, i, cfg) for i, m in enumerate(req.messages)], settings, req.stops, split,
                req.return_progress and req.stream)


MEDIA_PARTS = ("image_url", "video_url", "file")


def _message(m: Message, i: int, cfg: ServerConfig) -> dict:
    role = "system" if m.role == "developer" else m.role
    if not isinstance(m.content, list):
        return {"role": role, "content": m.content or ""}
    return {"role": role, "content": [_part(p, f"messages[{i}].content[{j}]", cfg) for j, p in enumerate(m.content)]}


def _part(p: ContentPart, param: str, cfg: ServerConfig) -> dict[str, Any]:
    """One content part as the runtime's part: text, image bytes, video bytes or PDF bytes."""
    if p.type == "text" and p.text is not None:
        return {"type": "text", "text": p.text}
    if p.type == "image_url" and p.image_url is not None:
        return {"type": "image", "image": image_bytes(_url(p.image_url), cfg, param + ".image_url")}
    if p.type == "video_url" and p.video_url is not None:
        return {"type": "video", "video": video_bytes(_url(p.video_url), cfg, param + ".video_url")}
    if p.type == "file" and p.file is not None:
        # the runtime's OpenAI-shaped part, its data decoded: the file name then names the PDF in errors
        return {"type": "file", "file": {"file_data": document_bytes(p.file, param + ".file"),
                                         "filename": p.file.filename}}
    raise invalid_field(f"content part of type {p.type!r} is not supported (text, {', '.join(MEDIA_PARTS)})", param)


def _url(u: Any) -> str:
    return u if isinstance(u, str) else u.url


def run_turn(model: KimiVL, turn: Turn, emit: Emit, cancelled: threading.Event) -> None:
    """On the worker thread: stream the turn's pieces through the stop strings; stop at once when cancelled."""
    tokens = model.stream_tokens(turn.messages, turn.settings)
    model.prefill_progress = prefill_progress(turn, tokens.stats, emit, cancelled)
    pieces = decode_pieces(_watched(tokens, emit, cancelled), model.tokenizer, turn.split_thinking)
    stop = StopFilter(turn.stops)
    answer: list[str] = []

    def send(events: list) -> None:
        for ev in events:
            if ev[0] == "answer":
                answer.append(ev[1])
            emit(ev)

    try:
        for piece in pieces:
            send(stop.feed(piece.kind, piece.text))
            if stop.stopped or cancelled.is_set():
                break
        send(stop.flush())
    except KimiVLError as e:  # the prompt does not fit, an image, video or PDF cannot be decoded, ...
        raise APIError(400, str(e), "invalid_request") from None
    finally:
        pieces.close()
        tokens.close()
        model.prefill_progress = None
    tokens.stats.encode_seconds += sum(turn.encoded_ahead)
    actions = parse_actions("".join(answer), tokens.image_sizes)
    emit(Done(tokens.stats, "stop" if stop.stopped else tokens.stats.finish_reason,
              [dataclasses.asdict(a) for a in actions]))


def _watched(tokens: Iterator[int], emit: Emit, cancelled: threading.Event) -> Iterator[int]:
    """``tokens``, with STARTED emitted before the first one, until the request is cancelled: checked per token, as
    text held back by the thinking split may yield no piece for many tokens."""
    for i, t in enumerate(tokens):
        if cancelled.is_set():
            return
        if i == 0:
            emit(STARTED)
        yield t


def usage(st: Stats) -> dict:
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
            "total_tokens": st.prompt_tokens + st.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": st.prompt_tokens - st.evaluated_tokens}}


def timings(st: Stats) -> dict:
    """llama-server's ``timings`` object, plus the vision encoder's time and the image tokens."""
    def per(n: int, s: float) -> tuple[float, float]:
        return (1e3 * s / n if n else 0.0), (n / s if s else 0.0)

    p_ms, p_tps = per(st.evaluated_tokens, st.prefill_seconds)
    d_ms, d_tps = per(st.generated_tokens, st.decode_seconds)
    return {"cache_n": st.prompt_tokens - st.evaluated_tokens, "prompt_n": st.evaluated_tokens,
            "prompt_ms": 1e3 * st.prefill_seconds, "prompt_per_token_ms": p_ms, "prompt_per_second": p_tps,
            "predicted_n": st.generated_tokens, "predicted_ms": 1e3 * st.decode_seconds,
            "predicted_per_token_ms": d_ms, "predicted_per_second": d_tps,
            "encode_ms": 1e3 * st.encode_seconds, "image_tokens": st.image_tokens, **_media_timings(st)}


def _media_timings(st: Stats) -> dict:
    """Video frames and PDF pages (kimivl_edge.media.MediaStats): counts, image tokens of each, the seconds spent
    decoding and rendering them, and the notes naming dropped pages. Empty when the turn had neither."""
    m = st.media
    if not (m.frames or m.pages):
        return {}
    return {"frames_n": m.frames, "frame_tokens": m.frame_tokens, "pages_n": m.pages, "page_tokens": m.page_tokens,
            "media_decode_ms": 1e3 * m.decode_seconds, "media_notes": m.notes}


def completion(cid: str, created: int, card: ModelCard, answer: str, reasoning: str | None, done: Done) -> dict:
    message: dict = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if done.grounding:
        message["grounding"] = done.grounding
    return {"id": cid, "object": "chat.completion", "created": created, "model": card.id,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": usage(done.stats), "timings": timings(done.stats)}


def chunk(cid: str, created: int, card: ModelCard, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": card.id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def final_chunk(cid: str, created: int, card: ModelCard, done: Done) -> dict:
    """The stream's chunk with the finish_reason, llama-server's ``timings`` and the answer's grounding."""
    out = chunk(cid, created, card, {"grounding": done.grounding} if done.grounding else {}, done.finish_reason)
    out["timings"] = timings(done.stats)
    return out


DELTA_FIELD = {"answer": "content", "reasoning": "reasoning_content"}
