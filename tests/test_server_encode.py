"""The server's encoder thread: a queued request's images are encoded while the request before it decodes, and
``KimiVL.pre_encode`` fills the same embedding cache a turn reads.

Ordering is asserted with events, not clocks: request A's token stream is held after its first token until the
vision encoder starts on request B's image. A server that encodes B only when A has finished never opens that gate
(the wait is bounded, so such a server fails the test instead of hanging)."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kimivl_edge.errors import KimiVLError
from kimivl_edge.model import KimiVL
from kimivl_edge.server.app import create_app
from kimivl_edge.server.config import ServerConfig
from test_server import ASSET, CTX, ThreadServer, ask, data_uri, load_tiny

GATE_SECONDS = 60  # bound on A's wait: only a server without the encoder thread ever reaches it


@pytest.fixture(scope="module")
def pair(converted):
    return converted(ASSET, "f32", "f32")


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    from kimivl_edge.demo import demo_images

    root = tmp_path_factory.mktemp("pics")
    demo_images(root)
    return root


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


def test_a_queued_image_is_encoded_while_the_running_request_decodes(pair, pics):
    record: dict = {}
    encode_started = threading.Event()
    encoder_threads: list[str] = []

    def loader() -> KimiVL:
        model = load_tiny(pair)()
        vision_encode, stream_tokens = model.vision.encode, model.stream_tokens

        def encode(*a, **k):
            encoder_threads.append(threading.current_thread().name)
            encode_started.set()
            return vision_encode(*a, **k)

        def held(messages, settings):  # the first turn (A) is held after its first token
            tokens = stream_tokens(messages, settings)
            return HeldTokens(tokens, encode_started, record) if not record else tokens

        model.vision.encode, model.stream_tokens = encode, held
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
        answer_b: list[str] = []
        b = threading.Thread(target=lambda: answer_b.append(c.chat.completions.create(
            model="tiny", messages=ask("How many shapes are there?", data_uri(pics / "three.png")), temperature=0,
            max_tokens=8).choices[0].message.content))
        b.start()
        rest = list(it)
        b.join(300)
    finally:
        srv.stop()
    assert record["gate_opened"], "B's image was not encoded while A was decoding"
    assert record["a_tokens_at_encode"] == 1 and rest and rest[-1].choices[0].finish_reason is not None
    assert encoder_threads == ["kimivl-encoder"]  # encoded once, beside the worker; B's turn found it cached
    assert answer_b and "3" in answer_b[0]


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
