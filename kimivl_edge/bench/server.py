"""Section 6: ``kimivl-edge serve`` over loopback (httpx, streamed) against the in-process API, same files and settings.

One child process first runs the in-process API (``KimiVL.stream_tokens``), closes it, then starts
``kimivl-edge serve`` as its own subprocess and drives it over HTTP:

- single request: a new image + question; time to the first token, and decode tokens/s (completion tokens after
  the first, over the time from the first to the end), as the caller sees them, both ways;
- follow-up: a second question about the same image, answered with one token (prefix reuse: only the new tokens
  are evaluated);
- aggregate: 1, 2 and 4 clients each sending a different text question at once; completion tokens of all over the
  wall time (prefill included), with ``--parallel 1`` (one request at a time) and ``--parallel 4`` (their decode
  steps batched).

Parent side (``server_section``), child side (``task_server``), the bench.md table (``server_markdown``), and a
``main`` that runs this section alone on a given pair:

    python -m kimivl_edge.bench.server --model TEXT.gguf --mmproj MMPROJ.gguf [--threads 1] [--runs 3]
"""
from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import KimiVLError
from ..prompt import user_message

CLIENTS = (1, 2, 4)
PARALLEL = (1, 4)
SERVER_START_SECONDS = 600  # bound on model load in the server subprocess
HTTP_TIMEOUT = 600.0


# -- child side -------------------------------------------------------------------------------------------------
def _messages(t: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """The question about a new noise image, as the in-process API takes it and as the HTTP API takes it."""
    from .tasks import _noise_image

    img = _noise_image(tuple(t["image"]), seed)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    # the HTTP request in OpenAI's wire shape (an image_url part), as clients send it
    http = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": t["question"]}]}]
    return [user_message(t["question"], [img])], http


def _follow(msgs: list[dict], answer: str, question: str) -> list[dict]:
    return msgs + [{"role": "assistant", "content": answer or "."}, user_message(question)]


def _timed(t0: float, first: float | None, end: float, n: int) -> dict:
    """Time to first token, and decode tokens/s after it."""
    if first is None or n < 2 or end <= first:
        return {"ttft": (first or end) - t0, "decode_tps": 0.0, "tokens": n}
    return {"ttft": first - t0, "decode_tps": (n - 1) / (end - first), "tokens": n}


def _inprocess_run(model: Any, t: dict, seed: int) -> dict:
    clock = time.perf_counter
    msgs, _ = _messages(t, seed)
    t0, first, ids = clock(), None, []
    for tok in model.stream_tokens(msgs, temperature=0.0, max_tokens=t["decode_tokens"]):
        first = first or clock()
        ids.append(tok)
    run = _timed(t0, first, clock(), len(ids))
    follow = _follow(msgs, model.detokenize(ids), t["followup"])
    t0 = clock()
    list(model.stream_tokens(follow, temperature=0.0, max_tokens=1))
    run["followup"] = clock() - t0
    return run


def _stream(client: Any, url: str, messages: list[dict], max_tokens: int) -> tuple[dict, str]:
    """One streamed chat completion: its figures and its text."""
    clock = time.perf_counter
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, end, n, text = clock(), None, None, 0, []
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise KimiVLError(f"the server answered {r.status_code}: {r.read().decode(errors='replace')[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            first = first or clock()
            ev = json.loads(line[6:])
            if "error" in ev:
                raise KimiVLError(f"the server failed: {ev['error']['message']}")
            if ev["choices"]:
                text.append(ev["choices"][0]["delta"].get("content") or "")
                end = clock() if ev["choices"][0]["finish_reason"] else end
            else:
                n = ev["usage"]["completion_tokens"]
    return _timed(t0, first, end or clock(), n), "".join(text)


def _http_run(client: Any, url: str, t: dict, seed: int) -> dict:
    _, msgs = _messages(t, seed)
    run, answer = _stream(client, url, msgs, t["decode_tokens"])
    t0 = time.perf_counter()
    _stream(client, url, _follow(msgs, answer, t["followup"]), 1)
    run["followup"] = time.perf_counter() - t0
    return run


def _aggregate(client: Any, url: str, clients: int, max_tokens: int) -> float:
    """Completion tokens/s of ``clients`` concurrent text requests, over the wall time of all."""
    counts: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)

    def one(i: int) -> None:
        start.wait()
        try:
            msgs = [user_message(f"Client {i}: write a long story about the number {i}.")]
            counts.append(_stream(client, url, msgs, max_tokens)[0]["tokens"])
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(t: dict, log: Path, parallel: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "kimivl_edge", "serve", "-m", t["text"], "--mmproj", t["mmproj"], "--port",
           str(port), "--threads", str(t["threads"]), "--max-queue", str(max(CLIENTS)), "--parallel", str(parallel)]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise KimiVLError(f"kimivl-edge serve did not become healthy (see {log})")


def task_server(t: dict) -> dict:
    """The in-process runs, then the same over HTTP; run 0 of each is a warm-up."""
    import httpx

    from ..model import KimiVL

    res: dict = {"inprocess": [], "http": [], "aggregate": {str(p): {str(c): [] for c in CLIENTS} for p in PARALLEL}}
    model = KimiVL.load(t["text"], t["mmproj"], n_threads=t["threads"])
    res["n_ctx"] = model.decoder.n_ctx
    try:
        res["inprocess"] = [_inprocess_run(model, t, 2000 + r) for r in range(t["runs"] + 1)][1:]
    finally:
        model.close()
    for p in PARALLEL:
        proc, url = _start_server(t, Path(t["log"]), p)
        try:
            with httpx.Client(timeout=HTTP_TIMEOUT, limits=httpx.Limits(max_connections=2 * max(CLIENTS))) as client:
                if p == 1:
                    res["http"] = [_http_run(client, url, t, 2000 + r) for r in range(t["runs"] + 1)][1:]
                _aggregate(client, url, max(CLIENTS), t["decode_tokens"])  # warm-up
                for _ in range(t["runs"]):
                    for c in CLIENTS:
                        res["aggregate"][str(p)][str(c)].append(_aggregate(client, url, c, t["decode_tokens"]))
        finally:
            proc.terminate()
            proc.wait(60)
    return res


# -- parent side ------------------------------------------------------------------------------------------------
def server_section(ch: Any, text: Path, mmproj: Path, runs: int, decode_tokens: int) -> dict:
    """Section 6 with the Q4_K_M text GGUF and the Q8_0 mmproj (the ``ttft`` section's pair)."""
    from .sections import FOLLOWUP_QUESTION, TTFT_IMAGE, TTFT_QUESTION, say, summarize

    say(f"server over loopback vs in-process, {text.name} + {mmproj.name}")
    data, _ = ch.run({"kind": "server", "text": str(text), "mmproj": str(mmproj), "threads": ch.threads,
                      "runs": runs, "image": list(TTFT_IMAGE), "question": TTFT_QUESTION,
                      "followup": FOLLOWUP_QUESTION, "decode_tokens": decode_tokens, "log": str(ch.log)})

    def side(runs_: list[dict]) -> dict:
        return {k: summarize([r[k] for r in runs_]) for k in ("ttft", "decode_tps", "followup")}

    inp, http = side(data["inprocess"]), side(data["http"])
    return {"files": f"{text.name} + {mmproj.name}", "n_ctx": data["n_ctx"], "decode_tokens": decode_tokens,
            "image": f"{TTFT_IMAGE[0]}x{TTFT_IMAGE[1]}",
            "inprocess": inp, "http": http,
            "http_over_inprocess_ttft": http["ttft"]["median"] / inp["ttft"]["median"],
            "http_over_inprocess_decode_tps": (http["decode_tps"]["median"] / inp["decode_tps"]["median"]
                                               if inp["decode_tps"]["median"] else None),
            "aggregate_tps": {p: {c: summarize(v) for c, v in by_c.items()} for p, by_c in data["aggregate"].items()}}


def server_markdown(r: dict) -> list[str]:
    from .report import _fmt

    s = r["server"]
    inp, http = s["inprocess"], s["http"]
    ratio = s["http_over_inprocess_decode_tps"]
    lines = ["", "## 6. Server over loopback", "",
             f"`kimivl-edge serve` ({s['files']}, context {s['n_ctx']}) driven by httpx with streamed "
             f"responses, against `KimiVL.stream_tokens` in-process; one {s['image']} image + question, up to "
             f"{s['decode_tokens']} tokens, greedy.", "",
             "| figure | in-process | HTTP | HTTP / in-process |", "|---|---|---|---|",
             f"| time to first token, s | {_fmt(inp['ttft'])} | {_fmt(http['ttft'])} | "
             f"{s['http_over_inprocess_ttft']:.3f} |",
             f"| decode tokens/s | {_fmt(inp['decode_tps'])} | {_fmt(http['decode_tps'])} | "
             f"{'-' if ratio is None else f'{ratio:.3f}'} |",
             f"| follow-up, same image, 1-token answer, s | {_fmt(inp['followup'])} | {_fmt(http['followup'])} | "
             f"{http['followup']['median'] / inp['followup']['median']:.3f} |", "",
             "| concurrent clients (text questions) | " + " | ".join(
                 f"completion tokens/s, all clients, `--parallel {p}`" for p in s["aggregate_tps"]) + " |",
             "|---" * (1 + len(s["aggregate_tps"])) + "|"]
    lines += [f"| {c} | " + " | ".join(_fmt(by_c[c]) for by_c in s["aggregate_tps"].values()) + " |"
              for c in next(iter(s["aggregate_tps"].values()))]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os
    import tempfile

    from .harness import Children

    ap = argparse.ArgumentParser(prog="python -m kimivl_edge.bench.server", description="bench section 6 alone")
    ap.add_argument("--model", required=True)
    ap.add_argument("--mmproj", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        s = server_section(Children(Path(work), a.threads), Path(a.model), Path(a.mmproj), a.runs, a.decode_tokens)
    print("\n".join(server_markdown({"server": s})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
