"""Request fields and server options beyond the basics of test_server.py: ``max_completion_tokens``, ``top_p``,
``seed``, the server's ``--reasoning-format none``, remote images with ``--allow-remote-images`` (a local HTTP
server, redirects included: to http they are followed, to file:// refused), the key from ``KIMIVL_EDGE_API_KEY``,
and the request log line."""
from __future__ import annotations

import http.server
import logging
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from kimivl_edge import serve
from kimivl_edge.gguf_model import TextModelInfo
from kimivl_edge.server.app import create_app
from kimivl_edge.server.config import ServerConfig
from test_server import ASSET, SCRIPT, ScriptedModel, ThreadServer, ask, data_uri, error_of, free_port, load_tiny

LONG = "one two three four five six seven eight nine ten"  # forced by a schema: the tiny model answers in 1 token


@pytest.fixture(scope="module")
def server(converted) -> Iterator[ThreadServer]:
    srv = ThreadServer(create_app(ServerConfig(model_id="m", allow_remote_images=True),
                                  load_tiny(converted(ASSET, "f32", "f32"))))
    srv.wait_ready()
    yield srv
    srv.stop()


def chat(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def answer(url: str, body: dict) -> str:
    return chat(url, body)["choices"][0]["message"]["content"]


def test_max_completion_tokens_caps_the_answer(server):
    forced = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"const": LONG}}}
    body = {"messages": [{"role": "user", "content": "Count."}], "temperature": 0, "response_format": forced}
    full = chat(server.url, body)
    assert full["usage"]["completion_tokens"] > 5 and full["choices"][0]["finish_reason"] == "stop"
    capped = chat(server.url, {**body, "max_completion_tokens": 5, "max_tokens": 40})  # the newer field wins
    assert capped["usage"]["completion_tokens"] == 5 and capped["choices"][0]["finish_reason"] == "length"
    assert full["choices"][0]["message"]["content"].startswith(capped["choices"][0]["message"]["content"])


def sampled(server, pics, seeds, **fields) -> list[str]:
    msgs = ask("What colour is the triangle?", data_uri(pics / "triangle.png"))
    return [answer(server.url, {"messages": msgs, "max_tokens": 8, "seed": s, **fields}) for s in seeds]


def test_seed_and_top_p(server, pics):
    greedy = sampled(server, pics, [0], temperature=0)[0]
    hot = sampled(server, pics, range(6), temperature=1.5)
    assert sampled(server, pics, range(6), temperature=1.5) == hot  # the same seed, the same answer
    assert len(set(hot)) > 1 and set(hot) != {greedy}  # other seeds, other answers
    # top_p this small keeps only the most likely token: every seed then answers as greedy decoding does
    assert sampled(server, pics, range(6), temperature=1.5, top_p=1e-6) == [greedy] * 6


def test_remote_images_are_fetched_and_a_redirect_to_file_is_refused(server, pics):
    png = (pics / "triangle.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            moved = {"/moved": "/triangle.png", "/to-file": (pics / "triangle.png").as_uri()}
            if self.path in moved:
                self.send_response(302)
                self.send_header("Location", moved[self.path])
                self.end_headers()
            elif self.path == "/triangle.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_error(404)

        def log_message(self, *args) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_address[1]}"
    try:
        for path in ("/triangle.png", "/moved"):
            got = answer(server.url, {"messages": ask("What colour is the triangle?", base + path),
                                      "temperature": 0, "max_tokens": 24})
            assert "yellow" in got.lower(), path
        for path in ("/to-file", "/missing.png"):
            r = httpx.post(server.url + "/v1/chat/completions",
                           json={"messages": ask("What colour?", base + path), "max_tokens": 4})
            assert r.status_code == 400, (path, r.text)
            assert error_of(r)["param"] == "messages[0].content[0].image_url"
    finally:
        web.shutdown()
        web.server_close()


def test_server_reasoning_format_none(tiny_checkpoint, converted):
    tok = TextModelInfo.read(converted(tiny_checkpoint("thinking"), "f32", "f32")[0]).tokenizer
    srv = ThreadServer(create_app(ServerConfig(model_id="s", reasoning_format="none"),
                                  lambda: ScriptedModel(tok, SCRIPT)))
    try:
        srv.wait_ready()
        msgs = [{"role": "user", "content": "Where?"}]
        raw = chat(srv.url, {"messages": msgs})["choices"][0]["message"]
        assert raw["content"] == SCRIPT and "reasoning_content" not in raw
        split = chat(srv.url, {"messages": msgs, "reasoning_format": "deepseek"})["choices"][0]["message"]
        assert (split["reasoning_content"], split["content"]) == ("Two shapes, é. Red left.",
                                                                  "The red one is on the left.")
    finally:
        srv.stop()


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("KIMIVL_EDGE_API_KEY", "sk-from-env")
    assert serve.config(serve.build_parser().parse_args(["-m", "x.gguf"])).api_key == "sk-from-env"
    assert serve.config(serve.build_parser().parse_args(["-m", "x.gguf", "--api-key", "k2"])).api_key == "k2"
    monkeypatch.delenv("KIMIVL_EDGE_API_KEY")
    assert serve.config(serve.build_parser().parse_args(["-m", "x.gguf"])).api_key is None


LOG_LINE = re.compile(r"^(\d{6}) (GET|POST) (\S+) (\d{3}) (prompt (\d+) completion (\d+)|-) (\d+\.\d{3})s$")


def test_one_log_line_per_request_with_id_status_tokens_and_seconds(server, caplog):
    caplog.set_level(logging.INFO, logger="kimivl_edge.server")
    ok = chat(server.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    bad = httpx.post(server.url + "/v1/chat/completions", json={"messages": [], "max_tokens": 3})
    assert bad.status_code == 422
    rid = ok["id"].removeprefix("chatcmpl-")

    def lines() -> list[re.Match]:  # this test's two requests: ids from the first one's on (a shared server)
        return [m for r in caplog.records if r.name == "kimivl_edge.server" and (m := LOG_LINE.match(r.getMessage()))
                and int(m.group(1)) >= int(rid)]

    deadline = time.monotonic() + 30  # a line is written just after the response's last byte: wait for both
    while len(lines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # a third line, if one were written, would show here
    # by id, not by order: the first request's line is written after its last byte, which can be after the
    # second, quick request has been answered and logged
    first, second = sorted(lines(), key=lambda m: int(m.group(1)))
    assert first.group(1) == rid and first.group(2, 3, 4) == ("POST", "/v1/chat/completions", "200")
    assert (int(first.group(6)), int(first.group(7))) == (ok["usage"]["prompt_tokens"],
                                                            ok["usage"]["completion_tokens"])
    assert second.group(4, 5) == ("422", "-") and int(second.group(1)) > int(rid)
    assert float(first.group(8)) >= 0 and float(second.group(8)) >= 0
