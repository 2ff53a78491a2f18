"""`kimivl-edge serve` with videos (vLLM's ``video_url`` part) and PDFs (OpenAI's ``file`` part), through the official
``openai`` client: the frames and pages reach the model in order (read back from the patches it receives: each
frame and page shows its own number, see tests/test_media.py), ``timings`` reports them, bad media are one-line
400s, ``video_url`` paths obey ``--media-dir``, and grounding actions come back in ``message.grounding``.
"""
from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from kimivl_edge.gguf_model import TextModelInfo
from kimivl_edge.media import MediaSettings
from kimivl_edge.model import KimiVL
from kimivl_edge.server.app import create_app
from kimivl_edge.server.config import ServerConfig
from test_media import _prompt_numbers, encrypted_pdf, picture, write_pdf, write_video
from test_server import ScriptedTokens, ThreadServer, error_of, serve_process

BODY = 4 << 20


def uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server-media")
    (root / "media").mkdir()
    write_video(root / "media" / "forty.mp4", 40)        # 4 s at 10 fps, frame i shows i
    write_video(root / "outside.mp4", 3)
    write_pdf(root / "doc.pdf", 2)                         # page k shows k
    (root / "media" / "escape.mp4").symlink_to(root / "outside.mp4")
    (root / "media" / "big.mp4").write_bytes(os.urandom(BODY + 1))
    return root


class Recorder:
    """Keeps every prompt the model renders (what reaches the vision encoder and the decoder)."""

    def __init__(self, model: KimiVL):
        self.prompts: list = []
        render = model.render_prompt

        def recorded(messages):
            self.prompts.append(render(messages))
            return self.prompts[-1]

        model.render_prompt = recorded  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def server(converted, files, tiny_checkpoint) -> Iterator[tuple[ThreadServer, Recorder]]:
    text, mm = converted(tiny_checkpoint(), "f32", "f32")

    def load() -> KimiVL:
        m = KimiVL.load(text, mm, n_ctx=4096, n_threads=1, kv_type="f32")
        m.media_settings = MediaSettings(page_patches=256)  # small pages: a quick test
        return m

    srv = ThreadServer(create_app(ServerConfig(model_id="kimi", media_dir=files / "media", max_body_bytes=BODY),
                                  load))
    srv.wait_ready()
    yield srv, Recorder(srv.scheduler.model)
    srv.stop()


def test_video_and_pdf_parts_reach_the_model_in_order(server, files):
    srv, rec = server
    content = [{"type": "image_url", "image_url": {"url": uri("image/png", png(picture(30, (56, 56))))}},
               {"type": "video_url", "video_url": {"url": uri("video/mp4", (files / "media/forty.mp4").read_bytes())}},
               {"type": "text", "text": "and"},
               {"type": "file", "file": {"file_data": uri("application/pdf", (files / "doc.pdf").read_bytes()),
                                         "filename": "doc.pdf"}},
               {"type": "text", "text": "Describe."}]
    r = srv.client().chat.completions.create(model="kimi", messages=[{"role": "user", "content": content}],
                                             max_tokens=2, temperature=0)
    # 4 s at the default 2 fps: 8 frames evenly spaced over 0..39, first and last included: round(k * 39 / 7)
    assert _prompt_numbers(rec.prompts[-1]) == [30, 0, 6, 11, 17, 22, 28, 33, 39, 1, 2]
    t = r.model_extra["timings"]
    # a 320x240 frame: 24x18 patches after padding to 28 (docs/model.md §4.3) = 108 tokens; the 56x56 image: 4
    assert t["frames_n"] == 8 and t["frame_tokens"] == [108] * 8 and t["pages_n"] == 2 and len(t["page_tokens"]) == 2
    assert t["image_tokens"] == 4 + 8 * 108 + sum(t["page_tokens"]) and t["media_decode_ms"] > 0
    assert t["media_notes"] == [] and r.usage.prompt_tokens == rec.prompts[-1].n_tokens


def test_video_path_under_media_dir_and_stream_timings(server):
    srv, rec = server
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": "forty.mp4"},
                                         {"type": "text", "text": "What?"}]}]
    chunks = list(srv.client().chat.completions.create(model="kimi", messages=msgs, max_tokens=2, stream=True))
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.model_extra["timings"]["frames_n"] == 8
    assert _prompt_numbers(rec.prompts[-1]) == [0, 6, 11, 17, 22, 28, 33, 39]


def post(url: str, part: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
                            "max_tokens": 1})


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def pdf(data: str | None = None, **kw) -> dict:
    return {"type": "file", "file": {**({"file_data": data} if data is not None else {}), **kw}}


def test_bad_media_are_one_line_openai_errors(server, files):
    srv, _ = server
    cases = [
        (video(uri("video/mp4", b"\x00\x00\x00\x18ftypmp42 not a video at all")), 400, "not a readable video"),
        (pdf(uri("application/pdf", b"%PDF-1.4 broken")), 400, "not a readable PDF"),
        (pdf(uri("application/pdf", encrypted_pdf(b"secret")), filename="locked.pdf"), 400,
         "locked.pdf: the PDF is password-protected"),
        (pdf(file_id="file-abc"), 400, "only inline 'file_data'"),
        (pdf("https://example.com/a.pdf"), 400, "file_data must be a data: URI"),
        (video("https://example.com/a.mp4"), 400, "video URL scheme 'https' is not allowed (data: or a path"),
        (video("file:///etc/passwd"), 400, "video URL scheme 'file' is not allowed"),
        (video("../outside.mp4"), 400, "video path is outside --media-dir"),
        (video(str(files / "outside.mp4")), 400, "video path is outside --media-dir"),
        (video("escape.mp4"), 400, "video path is outside --media-dir"),   # a symlink out of the directory
        (video("missing.mp4"), 400, "video file not found under --media-dir"),
        (video("big.mp4"), 413, "video file is larger than the request body limit"),
        (video("data:video/mp4;base64,@@@"), 400, "invalid base64"),
    ]
    for part, status, words in cases:
        r = post(srv.url, part)
        err = error_of(r)
        assert (r.status_code, "\n" in err["message"]) == (status, False), (part, r.text)
        assert words in err["message"], (words, err)
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().chat.completions.create(model="kimi", messages=[{"role": "user", "content": [cases[0][0]]}])
    assert "not a readable video" in e.value.body["message"]
    ok = srv.client().chat.completions.create(model="kimi", max_tokens=1,
                                              messages=[{"role": "user", "content": "still serving?"}])
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_media_parts_need_the_vision_model(converted, files, tiny_checkpoint):
    text, _ = converted(tiny_checkpoint(), "f32", "f32")
    srv = ThreadServer(create_app(ServerConfig(model_id="t"), lambda: KimiVL.load(text, n_ctx=512, n_threads=1)))
    try:
        srv.wait_ready()
        r = post(srv.url, pdf(uri("application/pdf", (files / "doc.pdf").read_bytes())))
        assert r.status_code == 422 and "without --mmproj" in error_of(r)["message"]
    finally:
        srv.stop()


def test_serve_takes_the_media_options_of_run_and_chat(converted, files, tmp_path, cli, tiny_checkpoint):
    """``kimivl-edge serve --max-frames 2 --video-tokens 300 --doc-tokens 100``: the 4 s video becomes 2 frames (8
    by default, as test_video_and_pdf_parts_reach_the_model_in_order shows); a video of larger frames and a PDF
    page over their budgets are one-line 400s naming the option to change."""
    text, mm = converted(tiny_checkpoint(), "f32", "f32")
    write_video(tmp_path / "large.mp4", 20, size=(640, 480))  # 2 frames of 192 tokens: over 300
    args = ["-m", str(text), "--mmproj", str(mm), "--threads", "1", "--kv-type", "f32", "--ctx", "4096",
            "--max-body", str(BODY), "--max-frames", "2", "--video-tokens", "300", "--doc-tokens", "100"]
    with serve_process(args, tmp_path / "server.log") as (_, url):
        ok = post(url, video(uri("video/mp4", (files / "media/forty.mp4").read_bytes())))
        assert ok.status_code == 200, ok.text
        assert ok.json()["timings"]["frames_n"] == 2
        for part, option in ((video(uri("video/mp4", (tmp_path / "large.mp4").read_bytes())), "--video-tokens"),
                             (pdf(uri("application/pdf", (files / "doc.pdf").read_bytes())), "--doc-tokens")):
            r = post(url, part)
            err = error_of(r)
            assert r.status_code == 400 and "\n" not in err["message"] and option in err["message"], r.text
    bad = cli("serve", "-m", str(text), "--max-frames", "0")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "max_frames" in bad.stderr


# ---------------------------------------------------------------------------------------------------------------
# Grounding in the response


class GroundingModel:
    """A vision model stand-in whose answer is a PyAutoGUI click, for a 200 x 100 screenshot."""

    SCRIPT = "pyautogui.click(x=0.25, y=0.5)"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.info = type("Info", (), {"is_thinking": False})()
        self.decoder = type("Dec", (), {"n_ctx": 512})()
        self.vision = object()

    def stream_tokens(self, messages, settings):
        tokens = ScriptedTokens(iter(self.tokenizer.encode(self.SCRIPT)), False)
        images = [p["image"] for p in messages[-1]["content"] if p["type"] == "image"] \
            if isinstance(messages[-1]["content"], list) else []
        tokens.image_sizes = [Image.open(io.BytesIO(b)).size for b in images]
        return tokens

    def close(self) -> None:
        pass


def test_grounding_actions_in_message_and_final_chunk(converted, tiny_checkpoint):
    text, _ = converted(tiny_checkpoint(), "f32", "f32")
    tok = TextModelInfo.read(text).tokenizer
    srv = ThreadServer(create_app(ServerConfig(model_id="g"), lambda: GroundingModel(tok)))
    try:
        srv.wait_ready()
        shot = uri("image/png", png(Image.new("RGB", (200, 100))))
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": shot}},
                                             {"type": "text", "text": "Click the button"}]}]
        m = srv.client().chat.completions.create(model="g", messages=msgs).choices[0].message
        assert m.content == GroundingModel.SCRIPT
        (action,) = m.model_extra["grounding"]
        # 0.25 of 200 px wide, 0.5 of 100 px high
        assert (action["kind"], action["points"], action["image_index"]) == ("click", [[50.0, 50.0]], 0)
        chunks = list(srv.client().chat.completions.create(model="g", messages=msgs, stream=True))
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert json.loads(finals[0].choices[0].delta.model_dump_json())["grounding"] == [action]
        plain = srv.client().chat.completions.create(model="g", messages=[{"role": "user", "content": "hi"}])
        assert "grounding" not in (plain.choices[0].message.model_extra or {})  # no image: nothing to ground in
    finally:
        srv.stop()
