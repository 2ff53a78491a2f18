"""`--parallel N`: concurrent requests decode together in one llama.cpp context (continuous batching).

The oracle is the in-process API answering the same requests one at a time on its own model. Overlap is made
certain with events, not clocks: the batched step is held (bounded waits) until the other requests are queued, or
until a client has gone."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kimivl_edge.grounding import GROUND_PROMPT
from kimivl_edge.model import KimiVL
from kimivl_edge.server import batch
from kimivl_edge.server.app import create_app
from kimivl_edge.server.config import ServerConfig
from test_server import ASSET, CTX, ThreadServer, ask, data_uri, load_tiny

WAIT = 60.0  # bound on every held step: only a server that does not batch ever reaches it
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def pair(converted):
    return converted(ASSET, "f32", "f32")


@pytest.fixture(scope="module")
def solo(pair) -> Iterator[KimiVL]:
    m = KimiVL.load(pair[0], pair[1], n_ctx=CTX, n_threads=1, kv_type="f32")
    yield m
    m.close()


# answers of 1, 29 and 29 tokens (pyautogui clicks): the short one leaves the batch while the
# others go on
QUESTIONS = [("What colour is the triangle?", "triangle.png"),
             (GROUND_PROMPT + "the blue square", "three.png"),
             (GROUND_PROMPT + "the red circle", "three.png")]


def solo_answer(model: KimiVL, pics: Path, question: str, image: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(pics / image)},
                                         {"type": "text", "text": question}]}]
    return model.generate(msgs, temperature=0, max_tokens=MAX_TOKENS).answer


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture()
def parallel_server(pair) -> Iterator[ThreadServer]:
    srv = ThreadServer(create_app(ServerConfig(model_id="tiny", parallel=3), load_tiny(pair)))
    srv.wait_ready()
    yield srv
    srv.stop()


def held_steps(monkeypatch, hold) -> list[int]:
    """Wrap BatchRunner.step: ``hold(runner)`` runs before each step; returns the batch sizes seen."""
    sizes: list[int] = []
    inner = batch.BatchRunner.step

    def step(runner):
        hold(runner)
        sizes.append(len(runner.running))
        return inner(runner)

    monkeypatch.setattr(batch.BatchRunner, "step", step)
    return sizes


def test_concurrent_greedy_requests_equal_one_at_a_time(parallel_server, pics, solo, monkeypatch):
    srv = parallel_server
    state: dict = {}
    inner_start = batch.BatchRunner.start
    model = srv.scheduler.model
    inner_pre_encode, prepared = model.pre_encode, []

    def pre_encode(messages):  # the encoder thread's work for each request, counted when done
        n = inner_pre_encode(messages)
        prepared.append(n)
        return n

    model.pre_encode = pre_encode

    def start(runner, job):  # the first request starts once the other two are queued, their images encoded
        if not state:
            state["first"] = True
            wait_for(lambda: srv.scheduler.waiting >= 2 and len(prepared) == 3, "the other requests")
        return inner_start(runner, job)

    monkeypatch.setattr(batch.BatchRunner, "start", start)
    sizes = held_steps(monkeypatch, lambda runner: None)
    c = srv.client(timeout=300)
    answers: dict[int, str] = {}

    def ask_one(i: int) -> None:
        q, img = QUESTIONS[i]
        r = c.chat.completions.create(model="tiny", messages=ask(q, data_uri(pics / img)), temperature=0,
                                      max_tokens=MAX_TOKENS)
        answers[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask_one, args=(i,)) for i in (1, 0, 2)]  # a 6-token answer first
    threads[0].start()
    wait_for(lambda: state, "the first request")
    for th in threads[1:]:
        th.start()
    for th in threads:
        th.join(300)
    assert sizes[:2] == [1, 3] and 2 in sizes  # the first alone, then all three in one step, then the longer two
    expected = {i: solo_answer(solo, pics, q, img) for i, (q, img) in enumerate(QUESTIONS)}
    assert answers == expected
    assert "yellow" in answers[0].lower() and answers[1].startswith("pyautogui.click(") and answers[2] != answers[1]


def test_cancelling_one_request_leaves_the_other_intact(parallel_server, pics, solo, monkeypatch):
    srv = parallel_server
    state: dict = {}

    def hold(runner):
        turns = list(runner.running.values())
        if "cancel_seen" in state:
            state.setdefault("after_cancel", len(turns))
        elif len(turns) == 1 and "b_queued" not in state:  # A alone: wait until B is queued
            wait_for(lambda: srv.scheduler.waiting >= 1, "request B")
            state["b_queued"] = True
        elif len(turns) == 2 and "cancel_seen" not in state:  # A and B: wait until A's client has gone
            state["both_running"] = True
            wait_for(lambda: any(t.cancelled.is_set() for t in turns), "A's disconnect")
            state["cancel_seen"] = True

    held_steps(monkeypatch, hold)
    c = srv.client(timeout=300)
    a = c.chat.completions.create(model="tiny", messages=ask(QUESTIONS[2][0], data_uri(pics / QUESTIONS[2][1])),
                                  temperature=0, max_tokens=MAX_TOKENS, stream=True)
    it = iter(a)
    next(it)  # A runs
    answer_b: list[str] = []
    q, img = QUESTIONS[1]
    b = threading.Thread(target=lambda: answer_b.append(c.chat.completions.create(
        model="tiny", messages=ask(q, data_uri(pics / img)), temperature=0,
        max_tokens=MAX_TOKENS).choices[0].message.content))
    b.start()
    wait_for(lambda: state.get("both_running"), "A and B decoding together")
    a.close()  # A's client goes away mid-generation
    b.join(300)
    assert state.get("cancel_seen") and state["after_cancel"] == 1  # A stopped at the next step, B went on
    assert answer_b == [solo_answer(solo, pics, q, img)]
    again = c.chat.completions.create(model="tiny", messages=ask(*QUESTIONS[0][:1], data_uri(pics / "triangle.png")),
                                      temperature=0, max_tokens=MAX_TOKENS)
    assert again.choices[0].message.content == solo_answer(solo, pics, *QUESTIONS[0])


def test_a_follow_up_reuses_its_slots_prefix(parallel_server, pics, solo):
    c = parallel_server.client(timeout=300)
    q, img = QUESTIONS[1]
    msgs = ask(q, data_uri(pics / img))
    first = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=MAX_TOKENS)
    other = c.chat.completions.create(model="tiny", messages=ask(*QUESTIONS[0][:1], data_uri(pics / "triangle.png")),
                                      temperature=0, max_tokens=MAX_TOKENS)  # lands in another free slot or not
    follow = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "How many shapes are there?"}]
    r = c.chat.completions.create(model="tiny", messages=follow, temperature=0, max_tokens=MAX_TOKENS)
    assert other.choices[0].message.content == solo_answer(solo, pics, *QUESTIONS[0])
    assert r.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 2
    assert "3" in r.choices[0].message.content


def test_a_failing_request_leaves_the_batch_usable(parallel_server, pics, solo):
    c = parallel_server.client(timeout=300)
    with pytest.raises(openai.BadRequestError) as e:  # does not fit the context: refused before any decode
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "shape " * (2 * CTX)}],
                                  max_tokens=4)
    assert "context" in e.value.body["message"]
    r = c.chat.completions.create(model="tiny", messages=ask(QUESTIONS[0][0], data_uri(pics / "triangle.png")),
                                  temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == solo_answer(solo, pics, *QUESTIONS[0])


def test_parallel_below_one_is_a_usage_error():
    from kimivl_edge.errors import UsageError
    from kimivl_edge.serve import build_parser, config

    with pytest.raises(UsageError, match="--parallel is too small: 0"):
        config(build_parser().parse_args(["-m", "x.gguf", "--parallel", "0"]))


def test_json_object_is_enforced_in_a_batch(parallel_server, pics):
    c = parallel_server.client(timeout=300)
    out: dict[int, str] = {}

    def one(i: int) -> None:  # a question the model answers in JSON (tests/test_server.py), twice at once
        q = "Give the bounding box of the yellow triangle."
        r = c.chat.completions.create(model="tiny", messages=ask(q, data_uri(pics / "triangle.png")), temperature=0,
                                      max_tokens=64, response_format={"type": "json_object"})
        out[i] = r.choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert all(isinstance(json.loads(out[i]), dict) for i in range(2)), out
