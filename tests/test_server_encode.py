"""The server's encoder thread: a queued request's images are encoded while the request before it decodes (one turn
at a time, and with ``--parallel 2`` while the running turns keep stepping), ``KimiVL.pre_encode`` fills the same
embedding cache a turn reads, and ``timings.encode_ms`` counts the encoder thread's work.

Ordering is asserted with events, not clocks: request A's token stream is held after its first token until the
vision encoder starts on request B's image. A server that encodes B only when A has finished never opens that gate
(the wait is bounded, so such a server fails the test instead of hanging)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from kimivl_edge.errors import KimiVLError
from kimivl_edge.model import KimiVL
from kimivl_edge.server.app import create_app
from kimivl_edge.server.batch import BatchRunner
from kimivl_edge.server.config import ServerConfig
from test_server import ASSET, CTX, ThreadServer, ask, data_uri, load_tiny

GATE_SECONDS = 60  # bound on A's wait: only a server without the encoder thread ever reaches it
LONG = "one two three four five six seven eight nine ten"  # forced by a schema: the tiny model answers in 1 token


@pytest.fixture(scope="module")
def pair(converted):
    return converted(ASSET, "f32", "f32")


class HeldTokens:
    """A TokenStream whose reader, after the first token, waits for ``gate`` before asking for the next one (the
    model's lock is not held while it waits)."""

    def __init__(self, inner, gate: threading.Event, record: dict):
        self.inner, self.gate, self.record, self.n = inner, gate, record, 0

    @property
    def stats(self):
        return self.inner.stats

    @property
    def image_sizes(self):
        return self.inner.image_sizes

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.n == 1:
            self.record["gate_opened"] = self.gate.wait(GATE_SECONDS)
            self.record["a_tokens_at_encode"] = self.n
        tok = next(self.inner)
        self.n += 1
        return tok

    def close(self) -> None:
        self.inner.close()


def chat(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def timed_encoder(model: KimiVL, threads: list[str], seconds: list[float], started: threading.Event,
                  gate: threading.Event | None = None, record: dict | None = None) -> None:
    """Wrap the model's vision encoder: record the calling thread and each call's own seconds (the oracle for
    ``encode_ms``), set ``started``, then (with a ``gate``) wait for it, recording whether it opened."""
    inner = model.vision.encode

    def encode(*a, **k):
        threads.append(threading.current_thread().name)
        started.set()
        if gate is not None and record is not None:
            record["gate_opened"] = gate.wait(GATE_SECONDS)
        t0 = time.perf_counter()
        out = inner(*a, **k)
        seconds.append(time.perf_counter() - t0)
        return out

    model.vision.encode = encode


def check_encode_ms(url: str, image: str, first: dict, seconds: list[float]) -> None:
    """``first`` (a turn whose image the encoder thread encoded) reports at least the encoder's own time; asking
    about the same image again encodes nothing and reports less than that."""
    assert len(seconds) == 1 and first["timings"]["encode_ms"] >= 1e3 * seconds[0] > 0
    again = chat(url, {"messages": ask("What colour is the triangle?", image), "temperature": 0, "max_tokens": 4})
    assert len(seconds) == 1 and again["timings"]["encode_ms"] < 1e3 * seconds[0]


def test_a_queued_image_is_encoded_while_the_running_request_decodes(pair, pics):
    record: dict = {}
    encode_started = threading.Event()
    encoder_threads: list[str] = []
    encode_seconds: list[float] = []

    def loader() -> KimiVL:
        model = load_tiny(pair)()
        stream_tokens = model.stream_tokens
        timed_encoder(model, encoder_threads, encode_seconds, encode_started)

        def held(messages, settings):  # the first turn (A) is held after its first token
            tokens = stream_tokens(messages, settings)
            return HeldTokens(tokens, encode_started, record) if not record else tokens

        model.stream_tokens = held
        return model

    srv = ThreadServer(create_app(ServerConfig(model_id="tiny"), loader))
    try:
        srv.wait_ready()
        c = srv.client(timeout=300)
        a = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Describe a triangle."}],
                                      temperature=0, max_tokens=8, stream=True)
        it = iter(a)
        next(it)  # A is running: the worker holds it after its first token
        record["a_running"] = True
        image = data_uri(pics / "three.png")
        answer_b: list[dict] = []
        b = threading.Thread(target=lambda: answer_b.append(chat(srv.url, {
            "messages": ask("How many shapes are there?", image), "temperature": 0, "max_tokens": 8})))
        b.start()
        rest = list(it)
        b.join(300)
        assert record["gate_opened"], "B's image was not encoded while A was decoding"
        assert record["a_tokens_at_encode"] == 1 and rest and rest[-1].choices[0].finish_reason is not None
        assert encoder_threads == ["kimivl-encoder"]  # encoded once, beside the worker; B's turn found it cached
        assert answer_b and "3" in answer_b[0]["choices"][0]["message"]["content"]
        check_encode_ms(srv.url, image, answer_b[0], encode_seconds)
    finally:
        srv.stop()


def test_batched_turns_keep_decoding_while_a_new_image_is_encoded(pair, pics, monkeypatch):
    """``--parallel 2``: A runs in the batch; B's image is encoded on the encoder thread while the worker goes on
    stepping A, and B starts once encoded. The encoder holds B's encode until A has taken two more steps; A's
    steps are held after its first one until B's encode has started (both waits bounded). A's answer is forced
    by a schema to take dozens of tokens."""
    encode_started, a_stepped = threading.Event(), threading.Event()
    record: dict = {}
    encoder_threads: list[str] = []
    encode_seconds: list[float] = []
    steps: list[int] = []  # running turns at each step
    inner_step = BatchRunner.step

    def step(runner: BatchRunner):
        if len(steps) == 1:
            record["encode_began"] = encode_started.wait(GATE_SECONDS)
        if encode_started.is_set():
            record.setdefault("first_step_in_encode", len(steps))
            if len(steps) - record["first_step_in_encode"] >= 2:
                a_stepped.set()
        steps.append(len(runner.running))
        return inner_step(runner)

    monkeypatch.setattr(BatchRunner, "step", step)

    def loader() -> KimiVL:
        model = load_tiny(pair)()
        timed_encoder(model, encoder_threads, encode_seconds, encode_started, a_stepped, record)
        return model

    srv = ThreadServer(create_app(ServerConfig(model_id="tiny", parallel=2), loader))
    try:
        srv.wait_ready()
        c = srv.client(timeout=300)
        a = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Count."}], temperature=0, max_tokens=64, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"const": LONG}}})
        it = iter(a)
        next(it)  # A is running in the batch
        image = data_uri(pics / "three.png")
        b = chat(srv.url, {"messages": ask("How many shapes are there?", image), "temperature": 0, "max_tokens": 8})
        rest = list(it)
        assert record["encode_began"] and record["gate_opened"], "A did not decode while B's image was encoded"
        assert "".join(ch.choices[0].delta.content or "" for ch in rest if ch.choices) == f'"{LONG}"'
        assert encoder_threads == ["kimivl-encoder"]
        assert "3" in b["choices"][0]["message"]["content"]
        check_encode_ms(srv.url, image, b, encode_seconds)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def model(pair) -> Iterator[KimiVL]:
    m = KimiVL.load(pair[0], pair[1], n_ctx=CTX, n_threads=1, kv_type="f32")
    yield m
    m.close()


def test_pre_encode_fills_the_cache_the_turn_reads(model, pics):
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(pics / "triangle.png")},
                                         {"type": "text", "text": "What colour is the triangle?"}]}]
    calls: list[int] = []
    inner = model.vision.encode
    model.vision.encode = lambda *a, **k: calls.append(1) or inner(*a, **k)
    try:
        assert model.pre_encode(msgs) == 1 and model.pre_encode(msgs) == 0
        out = model.generate(msgs, temperature=0, max_tokens=8)
    finally:
        del model.vision.encode
    assert calls == [1] and "yellow" in out.answer.lower()
    assert out.stats.image_tokens > 0


def test_pre_encode_on_a_closed_model_is_a_clear_error(pair, pics):
    m = KimiVL.load(pair[0], pair[1], n_ctx=CTX, n_threads=1, kv_type="f32")
    m.close()
    with pytest.raises(KimiVLError, match="closed"):
        m.pre_encode([{"role": "user", "content": [{"type": "image", "image": str(pics / "three.png")}]}])
