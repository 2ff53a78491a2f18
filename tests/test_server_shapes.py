"""Response shapes against llama.cpp's Python server (llama-cpp-python's bundled ``llama_cpp.server``) on our GGUF
pair (its ``mtmd`` chat format: llama.cpp's libmtmd loads our mmproj): wherever both servers return a field (model
list, chat completion with and without an image, stream chunk, usage, error), it has the same place and JSON type.
Both are called with the same request through the official ``openai`` client's raw responses."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from test_server import ASSET, ServerConfig, ThreadServer, ask, create_app, data_uri, free_port, load_tiny


def same_shape(ours, theirs, where: str = "") -> list[str]:
    """Places where both have a value and the JSON types differ (null matches anything: optional fields)."""
    if ours is None or theirs is None:
        return []
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [d for k in ours.keys() & theirs.keys() for d in same_shape(ours[k], theirs[k], f"{where}.{k}")]
    if isinstance(ours, list) and isinstance(theirs, list):
        return same_shape(ours[0], theirs[0], where + "[0]") if ours and theirs else []
    numbers = (int, float)
    if isinstance(ours, numbers) and isinstance(theirs, numbers) and not isinstance(ours, bool):
        return []
    return [] if type(ours) is type(theirs) else [f"{where}: {type(ours).__name__} vs {type(theirs).__name__}"]


def sse_events(text: str) -> list[dict]:
    return [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]


@pytest.fixture(scope="module")
def both(converted, tmp_path_factory):
    text, mm = converted(ASSET, "f32", "f32")
    ours = ThreadServer(create_app(ServerConfig(model_id="m"), load_tiny((text, mm))))
    port = free_port()
    log = tmp_path_factory.mktemp("lcp") / "llama_cpp_server.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(text), "--port", str(port),
                                 "--clip_model_path", str(mm), "--chat_format", "mtmd", "--n_ctx", "512",
                                 "--n_threads", "1"], stdout=f, stderr=subprocess.STDOUT)
    theirs = f"http://127.0.0.1:{port}"
    try:
        ours.wait_ready()
        for _ in range(600):
            assert proc.poll() is None, log.read_text()
            try:
                httpx.get(theirs + "/v1/models")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield ours.url, theirs
    finally:
        proc.terminate()
        proc.wait(30)
        ours.stop()


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def test_chat_completion_and_usage_shapes_match(both):
    body = {"model": "m", "messages": [{"role": "user", "content": "How many shapes are there?"}], "max_tokens": 4,
            "temperature": 0}
    ours, theirs = (post(u, body).json() for u in both)
    assert set(theirs) <= set(ours) and set(theirs["usage"]) <= set(ours["usage"])
    assert set(theirs["choices"][0]) <= set(ours["choices"][0])
    assert same_shape(ours, theirs) == []
    c = openai.OpenAI(base_url=both[0] + "/v1", api_key="x")  # and the SDK parses it
    assert c.chat.completions.create(**body).usage.prompt_tokens == ours["usage"]["prompt_tokens"]


def test_stream_chunk_shapes_match(both):
    body = {"model": "m", "messages": [{"role": "user", "content": "How many shapes are there?"}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    ours, theirs = (sse_events(post(u, body).text) for u in both)
    for o, t in [(ours[0], theirs[0]), (ours[1], theirs[1]), (ours[-1], theirs[-1])]:  # role, content, finish
        assert set(t) <= set(o) and set(t["choices"][0]) <= set(o["choices"][0])
        assert same_shape(o, t) == []
    assert theirs[0]["choices"][0]["delta"]["role"] == ours[0]["choices"][0]["delta"]["role"] == "assistant"
    assert ours[-1]["choices"][0]["finish_reason"] == theirs[-1]["choices"][0]["finish_reason"]


def test_error_shapes_match(both):
    ours, theirs = (post(u, {"messages": [{"role": "user", "content": "hi"}], "n": "x"}) for u in both)
    assert set(ours.json()) == set(theirs.json()) == {"error"}
    assert set(ours.json()["error"]) == set(theirs.json()["error"]) == {"message", "type", "param", "code"}
    assert same_shape(ours.json(), theirs.json()) == []
    assert ours.status_code == 422  # theirs answers 500 for a validation error (llama-cpp-python 0.3.36)



def test_model_list_shapes_match(both):
    ours, theirs = (httpx.get(u + "/v1/models").json() for u in both)
    assert set(ours) == set(theirs) == {"object", "data"} and ours["object"] == theirs["object"] == "list"
    assert {"id", "object", "owned_by"} <= set(ours["data"][0]) & set(theirs["data"][0])
    assert ours["data"][0]["object"] == theirs["data"][0]["object"] == "model"
    assert same_shape(ours, theirs) == []


def test_image_chat_shapes_and_answers_match(both, tmp_path):
    from kimivl_edge.demo import demo_images

    demo_images(tmp_path)
    body = {"model": "m", "messages": ask("What colour is the triangle?", data_uri(tmp_path / "triangle.png")),
            "max_tokens": 8, "temperature": 0}
    ours, theirs = (post(u, body).json() for u in both)
    assert set(theirs) <= set(ours) and same_shape(ours, theirs) == []
    assert all("yellow" in r["choices"][0]["message"]["content"].lower() for r in (ours, theirs))
