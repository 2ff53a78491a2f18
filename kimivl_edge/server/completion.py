"""One chat turn: the validated request -> a ``Turn`` (messages with image bytes, sampling settings, stops), run on
the worker thread -> events (``(kind, text)`` pieces, then ``Done``) -> OpenAI response objects."""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import KimiVLError, UsageError
from ..model import Stats, decode_pieces
from ..sampling import SamplingSettings
from .config import ServerConfig
from .errors import APIError, invalid_field
from .grammar import response_grammar
from .media import image_bytes
from .schemas import ChatRequest, Message
from .scheduler import Emit
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


@dataclass(frozen=True)
class Done:
    stats: Stats
    finish_reason: str


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
    n_images = sum(1 for m in req.messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")
    if n_images > cfg.max_images:
        raise APIError(413, f"{n_images} images exceed the limit of {cfg.max_images} per request (--max-images)",
                       "too_many_images", "messages")
    if n_images and not card.vision:
        raise invalid_field("this model was loaded without --mmproj: images are not available", "messages")
    try:
        settings = SamplingSettings(temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                                    seed=secrets.randbits(32) if req.seed is None else req.seed,
                                    grammar=response_grammar(req.response_format)).validate()
    except UsageError as e:
        raise invalid_field(str(e)) from None
    split = (req.reasoning_format or cfg.reasoning_format) == "deepseek" and card.thinking
    return Turn([_message(m, i, cfg) for i, m in enumerate(req.messages)], settings, req.stops, split)


def _message(m: Message, i: int, cfg: ServerConfig) -> dict:
    role = "system" if m.role == "developer" else m.role
    if not isinstance(m.content, list):
        return {"role": role, "content": m.content or ""}
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(m.content):
        param = f"messages[{i}].content[{j}]"
        if p.type == "text" and p.text is not None:
            parts.append({"type": "text", "text": p.text})
        elif p.type == "image_url" and p.image_url is not None:
            url = p.image_url if isinstance(p.image_url, str) else p.image_url.url
            parts.append({"type": "image", "image": image_bytes(url, cfg, param + ".image_url")})
        else:
            raise invalid_field(f"content part of type {p.type!r} is not supported (text, image_url)", param)
    return {"role": role, "content": parts}


def run_turn(model: KimiVL, turn: Turn, emit: Emit, cancelled: threading.Event) -> None:
    """On the worker thread: stream the turn's pieces through the stop strings; stop at once when cancelled."""
    tokens = model.stream_tokens(turn.messages, turn.settings)
    pieces = decode_pieces(_watched(tokens, emit, cancelled), model.tokenizer, turn.split_thinking)
    stop = StopFilter(turn.stops)
    try:
        for piece in pieces:
            for ev in stop.feed(piece.kind, piece.text):
                emit(ev)
            if stop.stopped or cancelled.is_set():
                break
        for ev in stop.flush():
            emit(ev)
    except KimiVLError as e:  # the prompt does not fit, an image cannot be decoded, ...
        raise APIError(400, str(e), "invalid_request") from None
    finally:
        pieces.close()
        tokens.close()
    emit(Done(tokens.stats, "stop" if stop.stopped else tokens.stats.finish_reason))


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
            "encode_ms": 1e3 * st.encode_seconds, "image_tokens": st.image_tokens}


def completion(cid: str, created: int, card: ModelCard, answer: str, reasoning: str | None, done: Done) -> dict:
    message: dict = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"id": cid, "object": "chat.completion", "created": created, "model": card.id,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": usage(done.stats), "timings": timings(done.stats)}


def chunk(cid: str, created: int, card: ModelCard, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": card.id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


DELTA_FIELD = {"answer": "content", "reasoning": "reasoning_content"}
