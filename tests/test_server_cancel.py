"""A client that disconnects stops its request's long work at once: a long prompt's prefill stops after the chunk
being evaluated, a vision encode after the layer being computed, one turn at a time and with ``--parallel 2``. The
decoder's state stays consistent: the same prompt asked again reuses exactly the evaluated chunk and answers as a
fresh model does.

The work is held (with events, bounded) at its first prefill chunk or encoder call until the server has seen the
disconnect (``Job.cancel`` ran), so the test does not depend on how fast the server notices it."""
from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from kimivl_edge.batch_decoder import BatchDecoder
from kimivl_edge.decoder import Decoder
from kimivl_edge.model import KimiVL
from kimivl_edge.server.app import create_app
from kimivl_edge.server.config import ServerConfig
from kimivl_edge.server.scheduler import Job
from test_server import ASSET, CTX, ThreadServer, ask, data_uri

N_BATCH = 64  # prefill chunk: the long prompt takes many
WAIT = 60     # bound on every wait for an event
LONG = "Count the words: " + "tree " * 600 + "How many?"


@pytest.fixture(scope="module")
def pair(converted):
    return converted(ASSET, "f32", "f32")


@pytest.fixture(scope="module")
def image(pics):
    return pics / "three.png"


def load(pair) -> KimiVL:
    return KimiVL.load(pair[0], pair[1], n_ctx=CTX, n_threads=1, kv_type="f32", n_batch=N_BATCH)


@pytest.fixture()
def cancelled(monkeypatch) -> threading.Event:
    """Set once the server has cancelled a job (a client went away)."""
    seen = threading.Event()
    inner = Job.cancel

    def cancel(job: Job) -> None:
        inner(job)
        seen.set()

    monkeypatch.setattr(Job, "cancel", cancel)
    return seen


@pytest.fixture(params=[1, 2], ids=["one-at-a-time", "batched"])
def parallel(request) -> int:
    return request.param


def send_then_drop(url: str, body: dict, started: threading.Event) -> None:
    """POST ``body`` on a raw connection and close it once ``started`` is set (the client goes away)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (host.encode(), len(data)) + data)
        assert started.wait(WAIT), "the work never started"


def chat(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_disconnect_stops_a_long_prefill(pair, parallel, cancelled, monkeypatch):
    chunks: list[int] = []  # full prefill chunks evaluated
    started = threading.Event()

    def held(inner):
        def decode(self, batch, n: int) -> None:
            if n == N_BATCH:
                chunks.append(n)
                if len(chunks) == 1:
                    started.set()
                    assert cancelled.wait(WAIT), "the server did not cancel the request"
            return inner(self, batch, n)
        return decode

    for cls in (Decoder, BatchDecoder):
        monkeypatch.setattr(cls, "_decode", held(cls._decode))
    srv = ThreadServer(create_app(ServerConfig(model_id="m", parallel=parallel), lambda: load(pair)))
    try:
        srv.wait_ready()
        body = {"messages": [{"role": "user", "content": LONG}], "temperature": 0, "max_tokens": 4}
        send_then_drop(srv.url, body, started)
        again = chat(srv.url, body)  # served after the cancelled request ended (FIFO)
    finally:
        srv.stop()
    n_prompt = again["usage"]["prompt_tokens"]
    assert n_prompt > 8 * N_BATCH
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == N_BATCH  # only the held chunk was evaluated
    assert len(chunks) == 1 + (n_prompt - N_BATCH) // N_BATCH
    fresh = load(pair)
    try:
        want = fresh.generate(body["messages"], temperature=0, max_tokens=4).answer
    finally:
        fresh.close()
    assert again["choices"][0]["message"]["content"] == want


def test_a_disconnect_stops_a_vision_encode(pair, image, parallel, cancelled):
    layers: list[list[int]] = []  # per encoder call, the layers it finished
    started = threading.Event()

    def loader() -> KimiVL:
        model = load(pair)
        inner = model.vision.encode

        def encode(*a, progress=None, **k):
            done: list[int] = []
            layers.append(done)
            if len(layers) == 1:
                started.set()
                assert cancelled.wait(WAIT), "the server did not cancel the request"

            def counted(i: int, n: int, unit: str) -> None:
                done.append(i)
                if progress is not None:
                    progress(i, n, unit)

            return inner(*a, progress=counted, **k)

        model.vision.encode = encode
        return model

    srv = ThreadServer(create_app(ServerConfig(model_id="m", parallel=parallel), loader))
    try:
        srv.wait_ready()
        body = {"messages": ask("How many shapes are there?", data_uri(image)), "temperature": 0, "max_tokens": 8}
        send_then_drop(srv.url, body, started)
        again = chat(srv.url, body)
    finally:
        srv.stop()
    assert len(layers) == 2 and layers[0] == [1]  # stopped after its first layer; the next request encoded again
    assert len(layers[1]) > 1 and "3" in again["choices"][0]["message"]["content"]
