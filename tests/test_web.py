"""The chat page at ``/`` in a real browser (Debian's chromium, headless, driven by Playwright) against a real
``kimivl-edge serve`` subprocess on the trained tiny models: images by file input and paste, right answers, a
follow-up with its grounding marker on the shape, Stop cancelling on the server, reload, rename, export/import,
settings per conversation, edits, refused images and requests next to the input, the Thinking model's reasoning
block, and, with answers injected at the route level, Markdown that renders and hostile output that stays inert, a
thinking block mid-stream and normalized grounding. No request may leave the server's origin. Screenshots at
1280x800 go to $KIMIVL_EDGE_WEB_SHOTS (docs/ for the README) or the test's temp dir. Without chromium, one test
fails naming the install command and conftest.py deselects the others.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from kimivl_edge.grounding import GROUND_PROMPT
from kimivl_edge.demo import demo_images
from kimivl_edge.serve import page_url

ASSET = Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets" / "kimi-vl-tiny"
THINKING_ASSET = ASSET.with_name("kimi-vl-tiny-thinking")  # trained to answer ◁think▷ ... ◁/think▷ answer
CHROMIUM = Path(os.environ.get("KIMIVL_EDGE_CHROMIUM", "/usr/bin/chromium"))
MISSING = (f"the page tests need chromium ({CHROMIUM} is missing): sudo apt-get install -y chromium "
           "(Debian/Ubuntu; or set KIMIVL_EDGE_CHROMIUM to another chromium)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_PIXELS = 40_000  # the page test's server refuses images over 200x200 (the demo images are smaller)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """``kimivl-edge serve`` in a subprocess, its URL and its log."""

    def __init__(self, text: Path, mmproj: Path, log: Path, *extra: str):
        self.url, self.log = f"http://127.0.0.1:{free_port()}", log
        with log.open("w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kimivl_edge", "serve", "-m", str(text), "--mmproj", str(mmproj), "--port",
                 self.url.rsplit(":", 1)[1], "--threads", "1", "--kv-type", "f32", "--ctx", "2048", *extra],
                stdout=f, stderr=subprocess.STDOUT)
        for _ in range(1200):
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become healthy")

    def wait_log(self, needle: str, count: int = 1) -> list[str]:
        """The log lines holding ``needle``, once the server has written ``count`` of them."""
        for _ in range(600):
            hit = [ln for ln in self.log.read_text().splitlines() if needle in ln]
            if len(hit) >= count:
                return hit
            time.sleep(0.1)
        raise AssertionError(f"not {count} log lines with {needle!r}:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        assert "Traceback" not in self.log.read_text()


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pics")
    out = demo_images(root)
    Image.new("RGB", (250, 250), (200, 10, 10)).save(root / "big.png")  # 62 500 pixels > MAX_PIXELS
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return {**out, "big.png": root / "big.png", "broken.png": root / "broken.png"}


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory) -> Iterator[Served]:
    text, mmproj = converted(ASSET, "f32", "f32")
    srv = Served(text, mmproj, tmp_path_factory.mktemp("srv") / "server.log", "--max-image-pixels", str(MAX_PIXELS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def thinking_server(converted, tmp_path_factory) -> Iterator[Served]:
    text, mmproj = converted(THINKING_ASSET, "f32", "f32")
    srv = Served(text, mmproj, tmp_path_factory.mktemp("thinking") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not chromium_found():
        pytest.fail(MISSING, pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def chromium_found() -> bool:
    return CHROMIUM.is_file()


def test_chromium_is_installed():
    """Without chromium, this is the one page test that runs (conftest.py deselects the others), and it fails with
    one line naming the install command."""
    if not chromium_found():
        pytest.fail(MISSING, pytrace=False)


def test_without_chromium_one_test_fails_naming_the_install_command(tmp_path):
    """This module run where chromium is missing (itself left out)."""
    env = {**os.environ, "KIMIVL_EDGE_CHROMIUM": str(tmp_path / "no-chromium")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k",
                          "not without_chromium", f"--basetemp={tmp_path / 'inner'}", __file__],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"1 failed, \d+ deselected in .*", summary), run.stdout
    line = f"the page tests need chromium ({tmp_path / 'no-chromium'} is missing): sudo apt-get install -y chromium"
    assert sum(ln.startswith(line) for ln in run.stdout.splitlines()) == 1, run.stdout


class Page:
    """A fresh browser profile on the page, recording every request and every dialog."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 800, ready: bool = True):
        self.url = url
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.chats: list[dict] = []  # the bodies the page sent to /v1/chat/completions
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", self._sent)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.load(ready)

    def _sent(self, request) -> None:
        self.requests.append(request.url)
        if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
            self.chats.append(json.loads(request.post_data))

    def load(self, ready: bool = True) -> None:
        """(Re)load the page; with ``ready``, until it has the model's settings."""
        self.page.goto(self.url + "/")
        if ready:
            self.page.wait_for_selector("body[data-ready]")

    def foreign_requests(self) -> list[str]:
        origin = urlsplit(self.url)
        return [u for u in self.requests if urlsplit(u).scheme not in ("data", "blob")
                and (urlsplit(u).scheme, urlsplit(u).netloc) != (origin.scheme, origin.netloc)]

    def greedy(self) -> None:
        self.page.click("#toggle-settings")
        self.page.fill("#set-temperature", "0")
        self.page.dispatch_event("#set-temperature", "change")
        self.page.click("#toggle-settings")

    def ask(self, text: str) -> str:
        """Send ``text`` with Enter; the finished answer's text."""
        n = self.page.locator(".msg.assistant").count()
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")
        return self.answer(n)

    def answer(self, n: int) -> str:
        done = self.page.locator(".msg.assistant:not(.streaming)").nth(n)
        done.locator(".actions, .meta:not(:empty)").first.wait_for()
        return done.locator(".body").inner_text()

    def attach(self, path: Path) -> None:
        """Choose ``path`` in the file picker; returns once its thumbnail is in the composer."""
        thumbs = self.page.locator("#attachments img")
        n = thumbs.count()
        self.page.set_input_files("#file-input", str(path))
        expect(thumbs).to_have_count(n + 1)

    def paste(self, path: Path) -> None:
        """A synthetic paste event carrying the image file, as the clipboard would deliver it; returns once its
        thumbnail is in the composer."""
        thumbs = self.page.locator("#attachments img")
        n = thumbs.count()
        self.page.evaluate("""([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true}));
        }""", [path.name, base64.b64encode(path.read_bytes()).decode()])
        expect(thumbs).to_have_count(n + 1)

    def close(self) -> None:
        assert not self.foreign_requests(), self.foreign_requests()
        assert not self.dialogs and not self.errors, (self.dialogs, self.errors)
        self.context.close()


@pytest.fixture()
def page(browser, server) -> Iterator[Page]:
    p = Page(browser, server.url)
    yield p
    p.close()


def shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("KIMIVL_EDGE_WEB_SHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sse(*deltas: dict, timings: dict | None = None, grounding: list | None = None) -> str:
    """An OpenAI stream of ``deltas``, as the server sends it (``grounding``: its parsed actions, in the final
    chunk's delta)."""
    def data(obj):
        return f"data: {json.dumps(obj)}\n\n"

    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    out = [data({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})]
    out += [data({**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in deltas]
    final = {"grounding": grounding} if grounding else {}
    out.append(data({**base, "choices": [{"index": 0, "delta": final, "finish_reason": "stop"}],
                     "timings": timings or {"predicted_per_second": 10.0, "image_tokens": 0, "prompt_n": 5,
                                            "cache_n": 0, "predicted_n": len(deltas)}}))
    out.append(data({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(deltas),
                                                        "total_tokens": 5 + len(deltas)}}))
    return "".join(out) + "data: [DONE]\n\n"


def mock_answer(p: Page, *deltas: dict, grounding: list | None = None) -> list[dict]:
    """Answer the page's next chat requests with ``deltas`` at the route level; the request bodies it sent."""
    sent: list[dict] = []

    def handle(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body=sse(*deltas, grounding=grounding))

    p.page.route("**/v1/chat/completions", handle)
    return sent


# Wraps the page's fetch of /v1/chat/completions: its stream passes event by event and stops twice, before the first
# event with answer text and before the one after it, until window.releaseStream(); body[data-held] says where.
HOLD_STREAM = """() => {
    const real = window.fetch;
    const answerText = (event) => {
        try { return JSON.parse(event.replace(/^data: /, "")).choices?.[0]?.delta?.content; } catch { return null; }
    };
    let release = null;
    window.releaseStream = () => release();
    const hold = (where) => {
        document.body.dataset.held = where;
        return new Promise((resolve) => { release = resolve; });
    };
    window.fetch = async (url, opts) => {
        const r = await real(url, opts);
        if (!String(url).endsWith("/v1/chat/completions") || !r.ok) return r;
        const enc = new TextEncoder();
        let buf = "", answered = 0;
        const events = new TransformStream({ async transform(text, out) {
            buf += text;
            for (let cut; (cut = buf.indexOf("\\n\\n")) >= 0;) {
                const event = buf.slice(0, cut + 2);
                buf = buf.slice(cut + 2);
                if (answered === 1) { answered = 2; await hold("after-answer"); }
                if (answered === 0 && answerText(event)) { answered = 1; await hold("before-answer"); }
                out.enqueue(enc.encode(event));
            }
        } });
        return new Response(r.body.pipeThrough(new TextDecoderStream()).pipeThrough(events),
                            {status: r.status, headers: r.headers});
    };
}"""


def thinking_turn(p: Page, question: str) -> tuple[str, str]:
    """Asks ``question`` with the stream held (HOLD_STREAM): the "Thinking" block is open, with reasoning, while no
    answer has come, and collapsed as soon as the answer's first piece is shown, while it still streams. The
    finished turn's reasoning and answer."""
    pg = p.page
    pg.evaluate(HOLD_STREAM)
    pg.fill("#input", question)
    pg.press("#input", "Enter")
    block = pg.locator(".msg.assistant.streaming details.thinking")
    pg.wait_for_selector("body[data-held=before-answer]")
    expect(block.locator(".reasoning")).not_to_be_empty()  # what streamed before the answer is reasoning
    assert block.get_attribute("open") is not None and pg.locator(".msg.assistant .body").inner_text() == ""
    pg.evaluate("window.releaseStream()")
    pg.wait_for_selector("body[data-held=after-answer]")
    expect(pg.locator(".msg.assistant.streaming .body")).not_to_be_empty()
    assert block.get_attribute("open") is None
    pg.evaluate("window.releaseStream()")
    answer = p.answer(0)
    done = pg.locator(".msg.assistant details.thinking")
    assert done.get_attribute("open") is None
    return done.locator(".reasoning").text_content(), answer


def marker_pixel(p: Page, selector: str, image: Path) -> tuple[float, float]:
    """The centre of an overlay marker, in pixels of the original image (from the drawn image's box)."""
    img = p.page.locator(".msg.assistant img.grounded").last.bounding_box()
    mark = p.page.locator(selector).last.bounding_box()
    w, h = Image.open(image).size
    cx, cy = mark["x"] + mark["width"] / 2, mark["y"] + mark["height"] / 2
    return (cx - img["x"]) * w / img["width"], (cy - img["y"]) * h / img["height"]


def colour_at(image: Path, x: float, y: float) -> tuple[int, int, int]:
    return Image.open(image).convert("RGB").getpixel((int(x), int(y)))


BLUE, YELLOW = (30, 60, 220), (235, 200, 0)  # kimivl_edge/demo.py's shape colours


# -- the real model --------------------------------------------------------------------------------------------
def test_image_by_file_input_then_a_follow_up_with_its_point_drawn_on_the_shape(page, pics, server, tmp_path):
    pg = page.page
    pg.click("#toggle-settings")
    assert float(pg.input_value("#set-temperature")) == 0.2  # the Instruct model card's temperature (docs/model.md §1)
    pg.click("#toggle-settings")
    page.greedy()
    page.attach(pics["three.png"])
    assert page.ask("How many shapes are there?").strip() == "3"
    assert pg.locator(".msg.user img.thumb").count() == 1
    meta = pg.locator(".msg.assistant .meta").first.inner_text()
    assert "image tokens" in meta and "tok/s" in meta and "TTFT" in meta
    answer = page.ask(GROUND_PROMPT + "the blue square")  # the model card's OS-agent prompt: a pyautogui click
    assert pg.locator(".msg.assistant").nth(1).locator(".mark-point").count() == 1, answer
    x, y = marker_pixel(page, ".mark-point", pics["three.png"])
    assert colour_at(pics["three.png"], x, y) == BLUE, (answer, x, y)
    assert "cached" in pg.locator(".msg.assistant .meta").nth(1).inner_text()  # the follow-up reused the prompt
    used = int(pg.locator("#ctx-text").inner_text().split("/")[0])
    assert used > 0 and float(pg.locator("#ctx-bar").get_attribute("aria-valuenow")) > 0
    pg.screenshot(path=str(shots_dir(tmp_path) / "web-chat.png"))


def test_pasted_images_several_in_one_message(page, pics):
    page.greedy()
    page.paste(pics["triangle.png"])
    assert page.ask("What colour is the triangle?").strip() == "yellow"
    page.paste(pics["one.png"])  # new images in a later turn, two in one message
    page.attach(pics["three.png"])
    assert page.ask("Which image has more shapes?").strip() == "second"
    assert page.page.locator(".msg.user").nth(1).locator("img.thumb").count() == 2


def test_dropped_image(page, pics):
    page.greedy()
    page.page.evaluate("""([name, b64]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"}));
        for (const type of ["dragover", "drop"]) {
            document.getElementById("messages").dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true,
                                                                                  cancelable: true}));
        }
    }""", ["one.png", base64.b64encode(pics["one.png"].read_bytes()).decode()])
    expect(page.page.locator("#attachments img")).to_have_count(1)
    assert page.ask("What shape is the green one?").strip() == "square"


def test_refused_images_are_shown_next_to_the_input(page, pics):
    pg = page.page
    pg.set_input_files("#file-input", str(pics["broken.png"]))
    expect(pg.locator("#composer-error")).to_contain_text("broken.png was not attached")
    expect(pg.locator("#attachments img")).to_have_count(0)
    page.attach(pics["big.png"])
    pg.fill("#input", "What colour is it?")
    pg.press("#input", "Enter")
    pg.wait_for_selector("#composer-error:not([hidden])")
    err = pg.inner_text("#composer-error")
    assert "Image refused" in err and "250x250" in err and "--max-image-pixels" in err
    assert pg.locator(".msg").count() == 0  # no broken bubble: the message went back to the composer
    assert pg.input_value("#input") == "What colour is it?" and pg.locator("#attachments img").count() == 1


def test_regenerate_and_edit_a_user_message(page, pics):
    pg = page.page
    page.greedy()
    page.attach(pics["triangle.png"])
    assert page.ask("What colour is the triangle?").strip() == "yellow"
    pg.click(".msg.assistant button:has-text('Regenerate')")
    assert page.answer(0).strip() == "yellow" and pg.locator(".msg").count() == 2
    pg.click(".msg.user button:has-text('Edit')")
    pg.fill(".msg.user textarea", "What shape is the yellow one?")
    pg.click(".msg.user button:has-text('Send')")
    assert page.answer(0).strip() == "triangle"
    assert pg.locator(".msg").count() == 2 and pg.locator(".msg.user img.thumb").count() == 1


# The stop test adds this response_format to the page's requests at the route level: the grammar admits the end of
# the answer only after 10 000 items "1, " (more tokens than max_tokens), so the turn cannot end before Stop, whatever
# the model (the random-weight one the test used before often ended its answer first).
ENDLESS = {"type": "json_schema", "json_schema": {"name": "endless", "schema": {
    "type": "array", "items": {"const": 1}, "minItems": 10_000}}}
STOP_MAX_TOKENS = 16_000


def test_editing_an_earlier_message_drops_the_turns_after_it(page, pics):
    pg = page.page
    page.greedy()
    page.attach(pics["triangle.png"])
    assert page.ask("What colour is the triangle?").strip() == "yellow"
    assert page.ask("What shape is the yellow one?").strip() == "triangle"
    pg.locator(".msg.user").first.locator("button:has-text('Edit')").click()
    pg.fill(".msg.user textarea", "What shape is the yellow one?")
    pg.click(".msg.user button:has-text('Send')")
    assert page.answer(0).strip() == "triangle"
    assert pg.locator(".msg").count() == 2 and pg.locator(".msg.user img.thumb").count() == 1
    [user] = page.chats[-1]["messages"]  # the server saw only the edited first turn, its image kept
    assert [p["type"] for p in user["content"]] == ["image_url", "text"]
    assert user["content"][1]["text"] == "What shape is the yellow one?"


def test_too_many_images_in_a_conversation_are_refused_next_to_the_input(page, pics):
    """The page resends the conversation's images with each turn, so the server's --max-images (8 by default)
    counts every image of the conversation: a ninth, in a later turn, is refused."""
    pg = page.page
    page.greedy()
    page.attach(pics["triangle.png"])
    assert page.ask("What colour is the triangle?").strip() == "yellow"
    pg.set_input_files("#file-input", [str(pics["one.png"])] * 8)
    expect(pg.locator("#attachments img")).to_have_count(8)
    pg.fill("#input", "Which image has more shapes?")
    pg.press("#input", "Enter")
    expect(pg.locator("#composer-error")).to_contain_text(
        "Image refused: 9 images exceed the limit of 8 per request (--max-images)")
    assert pg.locator(".msg").count() == 2 and pg.locator("#attachments img").count() == 8
    assert pg.input_value("#input") == "Which image has more shapes?"


def test_a_conversation_past_the_body_limit_is_refused_next_to_the_input(browser, converted, tmp_path):
    text, mmproj = converted(ASSET, "f32", "f32")
    srv = Served(text, mmproj, tmp_path / "server.log", "--max-body", "60000")
    noise = tmp_path / "noise.png"
    Image.frombytes("RGB", (150, 150), os.urandom(150 * 150 * 3)).save(noise)  # ~68 kB, ~90 kB as base64
    p = Page(browser, srv.url)
    try:
        pg = p.page
        p.attach(noise)
        pg.fill("#input", "What is this?")
        pg.press("#input", "Enter")
        expect(pg.locator("#composer-error")).to_have_text("request body exceeds 60000 bytes (--max-body)")
        assert pg.locator(".msg").count() == 0 and pg.locator("#attachments img").count() == 1
    finally:
        p.close()
        srv.stop()


def test_stop_and_escape_cancel_the_generation_on_the_server(browser, converted, tmp_path):
    text, mmproj = converted(ASSET, "f32", "f32")
    srv = Served(text, mmproj, tmp_path / "server.log", "--ctx", "16384")
    p = Page(browser, srv.url)
    try:
        pg = p.page
        pg.route("**/v1/chat/completions", lambda route: route.continue_(
            post_data=json.dumps({**json.loads(route.request.post_data), "response_format": ENDLESS})))
        pg.click("#toggle-settings")
        pg.fill("#set-max-tokens", str(STOP_MAX_TOKENS))
        pg.dispatch_event("#set-max-tokens", "change")
        for key, how in ((1, lambda: pg.click("#stop")), (2, lambda: pg.keyboard.press("Escape"))):
            pg.fill("#input", f"Count {key}")
            pg.press("#input", "Enter")
            expect(pg.locator(".msg.assistant.streaming .body")).to_have_text(re.compile(r"(1, ){8}"))
            how()
            pg.wait_for_selector(".msg.assistant:not(.streaming) .stopped")
            assert pg.locator("#send").is_visible() and not pg.locator("#stop").is_visible()
        # the server writes a request's line when it has noticed the disconnect
        lines = srv.wait_log("POST /v1/chat/completions", 2)
        assert len(lines) == 2 and all("(client gone)" in ln for ln in lines), lines
        for line in lines:  # the worker stopped each turn long before its max_tokens
            rid = line.split(" POST ")[0].split()[-1]
            completion = int(srv.wait_log(f"{rid} stopped:")[0].rsplit(" completion ", 1)[1])
            assert 8 <= completion < STOP_MAX_TOKENS, line
        # the worker is free again: a new request is answered
        assert httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200
    finally:
        p.close()
        srv.stop()


def test_reload_rename_export_delete_import(page, pics, tmp_path):
    pg = page.page
    page.greedy()
    page.attach(pics["triangle.png"])
    assert page.ask("What colour is the triangle?").strip() == "yellow"
    page.load()
    assert pg.locator("#conv-list .conv").count() == 1
    assert pg.locator(".msg.assistant .body").inner_text().strip() == "yellow"
    assert pg.locator(".msg.user img.thumb").count() == 1
    pg.click("#conv-list button:has-text('Rename')")
    pg.fill("#conv-list input.rename", "Triangle chat")
    pg.press("#conv-list input.rename", "Enter")
    expect(pg.locator("#conv-title")).to_have_text("Triangle chat")
    with pg.expect_download() as dl:
        pg.click("#export")
    exported = tmp_path / "export.json"
    dl.value.save_as(exported)
    doc = json.loads(exported.read_text())
    [conv] = doc["conversations"]
    assert conv["title"] == "Triangle chat" and [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    want = base64.b64encode(pics["triangle.png"].read_bytes()).decode()
    assert conv["messages"][0]["images"][0]["url"] == "data:image/png;base64," + want
    pg.click("#conv-list button:has-text('Delete')")
    # The sidebar changes once IndexedDB has committed the delete; reloading before that would race it.
    expect(pg.locator("#conv-list .conv-title")).to_have_text(["New chat"])
    page.load()
    assert pg.locator(".msg").count() == 0 and pg.locator("#conv-list .conv-title").all_inner_texts() == ["New chat"]
    pg.set_input_files("#import-file", str(exported))
    pg.wait_for_selector("#conv-list .conv-title:has-text('Triangle chat')")
    assert pg.locator(".msg.assistant .body").inner_text().strip() == "yellow"
    assert pg.locator(".msg.user img.thumb").get_attribute("src") == "data:image/png;base64," + want
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    pg.set_input_files("#import-file", str(bad))
    expect(pg.locator("#composer-error")).to_contain_text("not a kimivl-edge chat export")


def test_api_key_is_asked_for_and_used(browser, converted, pics, tmp_path):
    text, mmproj = converted(ASSET, "f32", "f32")
    srv = Served(text, mmproj, tmp_path / "server.log", "--api-key", "sk-page-test")
    p = Page(browser, srv.url, ready=False)
    try:
        pg = p.page
        assert httpx.get(srv.url + "/props").status_code == 401 and httpx.get(srv.url + "/").status_code == 200
        expect(pg.locator("#key-form")).to_be_visible()
        for key in ("wrong", "sk-page-test"):
            pg.fill("#key-input", key)
            pg.press("#key-input", "Enter")
            expect(pg.locator("#status")).to_contain_text("API key" if key == "wrong" else "context 2048")
        pg.wait_for_selector("body[data-ready]")
        p.greedy()
        p.attach(pics["triangle.png"])
        assert p.ask("What colour is the triangle?").strip() == "yellow"
    finally:
        p.close()
        srv.stop()


def test_a_thinking_model_streams_its_reasoning_into_the_block(browser, thinking_server, pics, tmp_path):
    p = Page(browser, thinking_server.url)
    try:
        pg = p.page
        expect(pg.locator("#status")).to_contain_text(" · thinking")
        pg.click("#toggle-settings")
        assert float(pg.input_value("#set-temperature")) == 0.8  # the Thinking model card's (docs/model.md §1)
        pg.click("#toggle-settings")
        p.greedy()
        p.attach(pics["one.png"])
        # The structure only: the tiny Thinking model's answers are not reliable (its training checkpoints answered
        # "What colour is the triangle?" with "yellow" at step 600 and 1200, "right" at 1800 and 2400). This one,
        # for the screenshot, the final checkpoint answers "square" after "I see a green square.".
        reasoning, answer = thinking_turn(p, "What shape is the green one?")
        assert reasoning.strip() and answer.strip() and reasoning.strip() not in answer, (reasoning, answer)
        assert not any(mark in reasoning + answer for mark in ("◁think▷", "◁/think▷")), (reasoning, answer)
        pg.locator(".msg.assistant details.thinking summary").click()  # it opens again on demand
        pg.screenshot(path=str(shots_dir(tmp_path) / "web-thinking.png"))
    finally:
        p.close()


# -- answers injected at the route level -----------------------------------------------------------------------
HOSTILE = """# Title
Some **bold**, *italic* and `code`.

- one
- two

1. first
2. second

| a | b |
|---|--:|
| 1 | 2 |

```python
print("<b>not bold</b>")
```

<img src=x onerror="alert('img')"> <script>alert('script')</script>
[click me](javascript:alert('link')) [also](JaVaScRiPt:alert(1)) [data](data:text/html,<script>alert(1)</script>)
![pixel](http://tracker.example/p.png) [fine](https://example.com/docs)
<a href="javascript:alert('a')">raw</a>"""


def test_markdown_renders_and_hostile_output_stays_inert(page):
    pg = page.page
    sent = mock_answer(page, *({"content": HOSTILE[i:i + 7]} for i in range(0, len(HOSTILE), 7)))
    page.ask("Show me Markdown.")
    body = pg.locator(".msg.assistant .body")
    assert body.locator("h3").inner_text() == "Title"
    assert body.locator("strong").inner_text() == "bold" and body.locator("em").inner_text() == "italic"
    assert body.locator("ul li").all_inner_texts() == ["one", "two"]
    assert body.locator("ol li").all_inner_texts() == ["first", "second"]
    assert body.locator("table th").all_inner_texts() == ["a", "b"]
    assert body.locator("table td").all_inner_texts() == ["1", "2"]
    assert body.locator("pre code").inner_text() == 'print("<b>not bold</b>")'
    assert pg.locator("img[onerror], script:not([src]), #messages script, #messages b").count() == 0
    assert [a.get_attribute("href") for a in body.locator("a").all()] == ["https://example.com/docs"]
    text = body.inner_text()
    assert "<img src=x onerror=" in text and "<script>" in text and "javascript:alert('link')" in text
    assert "[image: pixel]" in text
    page.load()  # the stored answer renders the same way
    assert pg.locator("#messages img:not(.thumb)").count() == 0 and not page.dialogs
    assert sent[0]["stream"] is True and sent[0]["messages"][-1]["content"][-1]["text"] == "Show me Markdown."


def test_settings_reach_the_request_and_stay_with_their_conversation(page):
    pg = page.page
    mock_answer(page, {"content": "ok"})
    pg.click("#toggle-settings")
    assert float(pg.input_value("#set-temperature")) == 0.2  # the Instruct model card's (docs/model.md §1)
    pg.fill("#set-temperature", "0.7")
    pg.fill("#set-max-tokens", "64")
    pg.fill("#set-system", "Answer in French.")
    pg.dispatch_event("#set-system", "change")
    page.ask("First chat")
    first = page.chats[-1]
    assert first["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert first["temperature"] == 0.7 and first["max_tokens"] == 64
    pg.click("#new-chat")  # a new conversation starts from the model's defaults, with no system prompt
    assert float(pg.input_value("#set-temperature")) == 0.2 and pg.input_value("#set-system") == ""
    assert pg.input_value("#set-max-tokens") != "64"
    page.ask("Second chat")
    second = page.chats[-1]
    assert [m["role"] for m in second["messages"]] == ["user"] and second["temperature"] == 0.2
    pg.click("#conv-list .conv-title:has-text('First chat')")
    shown = ("#set-temperature", "#set-max-tokens", "#set-system")
    assert [pg.input_value(k) for k in shown] == ["0.7", "64", "Answer in French."]
    page.load()  # kept in the browser with the conversation
    assert pg.inner_text("#conv-title") == "First chat"
    assert [pg.input_value(k) for k in shown] == ["0.7", "64", "Answer in French."]
    page.ask("Again")
    again = page.chats[-1]
    assert [m["role"] for m in again["messages"]] == ["system", "user", "assistant", "user"]
    assert again["messages"][0]["content"] == "Answer in French." and again["temperature"] == 0.7


def test_thinking_answer_in_a_collapsible_block(page, pics):
    reasoning = "The image shows one shape. It has three corners, so it is a triangle, and it is yellow."
    mock_answer(page, *({"reasoning_content": w + " "} for w in reasoning.split()), {"content": "The triangle is "},
                {"content": "**yellow**."})
    page.attach(pics["triangle.png"])
    shown, answer = thinking_turn(page, "What colour is the triangle? Think first.")
    assert shown == reasoning + " " and answer == "The triangle is yellow."
    page.page.locator(".msg.assistant details.thinking summary").click()


@pytest.mark.parametrize("answer, selector, want", [
    ("pyautogui.click(x=0.75, y=0.52)", ".mark-point", (105.0, 49.92)),  # normalized: 0.75*140, 0.52*96
    ('{"bbox_2d": [0.6, 0.25, 0.9, 0.8]}', ".mark-box", (105.0, 50.4)),   # the box's centre
])
def test_grounding_overlay_on_the_shape(page, pics, answer, selector, want):
    mock_answer(page, {"content": answer})
    page.attach(pics["triangle.png"])
    page.ask("Click the triangle.")
    x, y = marker_pixel(page, selector, pics["triangle.png"])
    assert abs(x - want[0]) < 1 and abs(y - want[1]) < 1
    assert colour_at(pics["triangle.png"], x, y) == YELLOW


def test_grounding_overlay_uses_the_servers_actions(page, pics):
    """The server's parsed actions win over the page's own parse: here the text has no coordinates at all."""
    click = {"kind": "click", "points": [[105.0, 49.92]], "boxes": [], "text": None, "amount": None,
             "image_index": 0, "normalized": [0.75, 0.52]}
    mock_answer(page, {"content": "The triangle."}, grounding=[click])
    page.attach(pics["triangle.png"])
    page.ask("Click the triangle.")
    x, y = marker_pixel(page, ".mark-point", pics["triangle.png"])
    assert abs(x - 105.0) < 1 and abs(y - 49.92) < 1 and colour_at(pics["triangle.png"], x, y) == YELLOW


# -- keyboard and layout -----------------------------------------------------------------------------------------
def test_serve_prints_the_pages_address(server):
    assert server.wait_log(f"chat page at {server.url}/")


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:8080/"), ("::1", "http://[::1]:8080/"),
                                       ("0.0.0.0", "http://127.0.0.1:8080/"), ("::", "http://[::1]:8080/"),
                                       ("192.168.1.5", "http://192.168.1.5:8080/")])
def test_page_address_for_the_bound_host(host, url):
    assert page_url(host, 8080) == url


def test_shift_enter_is_a_new_line(page):
    page.page.fill("#input", "a")
    page.page.press("#input", "Shift+Enter")
    page.page.type("#input", "b")
    assert page.page.input_value("#input") == "a\nb" and page.page.locator(".msg").count() == 0


@pytest.mark.parametrize("width, height", [(360, 740), (1920, 1080)])
def test_usable_at_360_and_1920_px(browser, server, pics, width, height):
    p = Page(browser, server.url, width, height)
    try:
        pg = p.page
        mock_answer(p, {"content": "A long answer " * 40})
        p.attach(pics["three.png"])
        p.ask("How many shapes are there?")
        assert pg.evaluate("document.documentElement.scrollWidth") <= width
        for sel in ("#input", "#send", "#toggle-settings", ".msg.user img.thumb"):
            box = pg.locator(sel).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, sel
        side = pg.locator("#sidebar")
        if width < 720:
            assert side.bounding_box()["x"] + side.bounding_box()["width"] <= 0  # off-screen until asked for
            pg.click("#toggle-sidebar")
            expect(side).to_be_in_viewport(ratio=1)
            assert pg.locator("#conv-list .conv").count() == 1
        else:
            assert side.is_visible() and side.bounding_box()["x"] == 0
    finally:
        p.close()
