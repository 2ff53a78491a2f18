"""llama-server's ``return_progress`` (prompt_progress chunks while the prompt is evaluated) and the grounding field,
in both of the server's decode paths: one turn at a time (``parallel=1``) and continuous batching (``parallel=2``).

The grounded answer is forced with a JSON schema whose only value is a box, so the trained tiny model (which answers
points in pixels) writes Kimi-VL's normalized ``bbox_2d`` form; the expected pixels are the box times the image's
own size, written out here."""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from kimivl_edge.server.app import create_app
from kimivl_edge.server.config import ServerConfig
from test_server import ASSET, ThreadServer, ask, data_uri, load_tiny

BOX = [0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def pair(converted):
    return converted(ASSET, "f32", "f32")


@pytest.fixture(scope="module")
def image(pics):
    return pics / "three.png"


@pytest.fixture(scope="module", params=[1, 2], ids=["one-at-a-time", "batched"])
def server(request, pair) -> Iterator[ThreadServer]:
    srv = ThreadServer(create_app(ServerConfig(model_id="tiny", parallel=request.param), load_tiny(pair)))
    srv.wait_ready()
    yield srv
    srv.stop()


def stream(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_return_progress_streams_prompt_progress(server, image):
    msgs = ask("How many shapes are there?", data_uri(image))
    chunks = stream(server.url, {"messages": msgs, "max_tokens": 4, "temperature": 0, "return_progress": True})
    progress = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    timings = chunks[-1]["timings"] if "timings" in chunks[-1] else next(c["timings"] for c in chunks if "timings" in c)
    total = timings["cache_n"] + timings["prompt_n"]
    assert progress, "no prompt_progress chunk"
    assert all(p["total"] == total and p["cache"] == timings["cache_n"] for p in progress)
    done = [p["processed"] for p in progress]
    assert done == sorted(done) and done[-1] == total and done[0] > timings["cache_n"]
    assert all(c["choices"] == [] or c["choices"][0]["delta"] == {} for c in chunks if "prompt_progress" in c)
    first = chunks.index(next(c for c in chunks if "prompt_progress" in c))
    assert not any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks[:first])
    plain = stream(server.url, {"messages": msgs, "max_tokens": 4, "temperature": 0})
    assert not any("prompt_progress" in c for c in plain)  # only when asked for


def test_grounding_field_in_both_decode_paths(server, image):
    from PIL import Image

    schema = {"type": "object", "properties": {"bbox_2d": {"const": BOX}}, "required": ["bbox_2d"],
              "additionalProperties": False}
    body = {"messages": ask("Where is the blue square?", data_uri(image)), "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "box", "schema": schema}}}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert json.loads(msg["content"]) == {"bbox_2d": BOX}
    w, h = Image.open(image).size
    (action,) = msg["grounding"]
    assert action["boxes"] == [[BOX[0] * w, BOX[1] * h, BOX[2] * w, BOX[3] * h]]
    final = next(c for c in stream(server.url, body) if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["choices"][0]["delta"]["grounding"] == [action]
