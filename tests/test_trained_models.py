"""The trained tiny models (Instruct and Thinking) through the runtime, as users reach them: grounding answers parsed
and mapped by the runtime, questions across video frames (a video file through the video path) and document pages
(a PDF through pypdfium2), the Thinking model's reasoning split from its answer, and its history handling.

Expected values come from the scenes themselves (the shapes' rendered pixels, which frame or page holds what),
never from the code under test. Held-out questions use a seed neither training ([seed, 1]), evaluate.py (1000) nor
test_training.py (2024) uses. Thresholds sit well under the 600-question figures of the README and well over the
blind baselines (blank images, same questions).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_edge.image import target_size
from kimivl_edge.media import MediaSettings
from kimivl_edge.model import KimiVL
from kimivl_edge.prompt import THINK_CLOSE, THINK_OPEN, expand_media
from training import tasks
from training.train import Encoder

ASSETS = Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets"
CKPT = {"instruct": ASSETS / "kimi-vl-tiny", "thinking": ASSETS / "kimi-vl-tiny-thinking"}
SEED = 3030
MAX_TOKENS = {"instruct": 48, "thinking": 160}
# stated shares of unseen questions, well under the 600-question figures of the README (and above the blind ones)
GROUND_SHARE = {"instruct": 0.45, "thinking": 0.04}
BOX_SHARE = {"instruct": 0.1, "thinking": 0.0}
MULTI_SHARE = {"move": 0.75, "appear": 0.4, "red": 0.3, "pages2": 0.25}


@pytest.fixture(scope="module", params=["instruct", "thinking"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(variant, converted):
    text, mmproj = converted(CKPT[variant], "q8_0", "f16")  # the converter's defaults
    with KimiVL.load(text, mmproj, kv_type="f32", n_ctx=2048, n_threads=1) as m:
        yield m


def ask(m: KimiVL, variant: str, messages: list[dict]):
    return m.generate(messages, temperature=0, max_tokens=MAX_TOKENS[variant])


def _palette(img: Image.Image) -> Image.Image:
    return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)  # exact: a scene has at most 4 flat colours


def video_of(q: tasks.Question, blank: bool = False) -> bytes:
    """The frames as a lossless video (FFV1 in Matroska, 2 fps, written by PyAV): every frame kept and exact (a GIF
    writer merges identical frames, such as the empty ones before a shape appears)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("ffv1", rate=2)
        stream.width, stream.height = q.scenes[0].width, q.scenes[0].height
        stream.pix_fmt = "bgr0"
        for s in q.scenes:
            out.mux(stream.encode(av.VideoFrame.from_image(s.render(blank))))
        out.mux(stream.encode())
    return buf.getvalue()


def pdf_of(q: tasks.Question, blank: bool = False) -> bytes:
    pages = [_palette(s.render(blank)) for s in q.scenes]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72)  # 1 pixel = 1 point
    return buf.getvalue()


def media_messages(q: tasks.Question, blank: bool = False) -> list[dict]:
    """The question as a user sends it: a video part holding the GIF, or a document part holding the PDF."""
    part = ({"type": "video", "video": video_of(q, blank)} if q.media == "video" else
            {"type": "document", "document": pdf_of(q, blank)})
    return [{"role": "user", "content": [part, {"type": "text", "text": q.text}]}]


def media_settings(q: tasks.Question) -> MediaSettings:
    """Every frame of the clip; each page rendered to its own size in pixels (PAGE_SIZE at 1 pixel per point)."""
    w, h = tasks.PAGE_SIZE
    return MediaSettings(frames=len(q.scenes), page_patches=w * h // 196)


def test_held_out_questions_far_above_blind(model, variant):
    """Two held-out questions per task through the runtime (Q8_0 text, F16 mmproj): far above the same questions with
    blank images (600 held-out in the README: Instruct 70.8 % against 19.8 % blind, Thinking 62.2 % against 17.5 %)."""
    qs = tasks.question_set(SEED + 30, 2 * len(tasks.SINGLE_TASKS), tasks.SINGLE_TASKS)
    seeing = sum(tasks.is_correct(q, ask(model, variant, q.messages()).answer) for q in qs) / len(qs)
    blind = sum(tasks.is_correct(q, ask(model, variant, q.messages(blank=True)).answer) for q in qs) / len(qs)
    assert seeing >= 0.5 and blind <= 0.4 and seeing - blind >= 0.3, (seeing, blind)


# ---------------------------------------------------------------------------------------------------------------
# Grounding


def test_grounding_answers_land_in_the_named_shape(model, variant):
    """Ground questions on scenes of 1-3 shapes, most larger than the model's patch budget (resized, then padded):
    the runtime's parser (Generation.grounding) maps the model's normalized click to pixels of the original image,
    and that pixel lies inside the named shape as rendered (600 held-out in the README: Instruct 58 %, Thinking
    14 %). Blank images: about the shape's area share (2.5 %)."""
    qs = tasks.question_set(SEED, 24, ("ground",))
    resized = sum(target_size(q.scenes[0].width, q.scenes[0].height, model.image_config) !=
                  (q.scenes[0].width, q.scenes[0].height) for q in qs)
    assert resized >= 8
    hits, blind = 0, 0
    for q in qs:
        for blank in (False, True):
            g = ask(model, variant, q.messages(blank=blank))
            clicks = [a for a in g.grounding if a.kind == "click"]
            ok = len(clicks) == 1 and tasks.hit(q, *clicks[0].points[0])
            if blank:
                blind += ok
            else:
                hits += ok
    assert hits >= GROUND_SHARE[variant] * len(qs) and hits > blind, (hits, blind)
    assert blind <= 0.2 * len(qs), blind


def test_box_answers_overlap_the_named_shape(model, variant):
    """Box questions: the runtime's bbox_2d, in original pixels, has IoU >= 0.5 with the shape's rendered box
    (Instruct 20 % of 600 held-out in the README; the Thinking model's boxes miss: 0 %, only their form is checked)."""
    qs = tasks.question_set(SEED + 1, 16, ("box",))
    good, parsed = 0, 0
    for q in qs:
        boxes = [b for a in ask(model, variant, q.messages()).grounding for b in a.boxes]
        assert q.target is not None
        parsed += len(boxes) == 1
        good += len(boxes) == 1 and tasks.iou(boxes[0], tasks.shape_box(q.target, q.scenes[0])) >= 0.5
    assert parsed >= 0.75 * len(qs), parsed
    assert good >= BOX_SHARE[variant] * len(qs), good


# ---------------------------------------------------------------------------------------------------------------
# Many images: video frames and document pages through the media paths


@pytest.mark.parametrize("task", tasks.MULTI_TASKS)
def test_questions_across_frames_and_pages_through_the_media_paths(model, variant, task):
    """Each question's frames go in as a video file (the video path samples every frame, first and last
    included), its pages as a PDF (rendered by pypdfium2 at the page's own budget): the frames and pages reach the
    model in order, and it answers above the blind baseline (the same files with blank frames and pages). "page"
    (which page shows the named shape) is at chance for the Thinking model and little above it for Instruct (28 % and
    44 % of 600 held-out in the README, chance 31 %): only its form is checked."""
    qs = tasks.question_set(SEED + 2 + tasks.MULTI_TASKS.index(task), 24, (task,))
    right, blind, formed = 0, 0, 0
    for q in qs:
        model.media_settings = media_settings(q)
        g = ask(model, variant, media_messages(q))
        assert (g.stats.media.frames, g.stats.media.pages) == ((len(q.scenes), 0) if q.media == "video" else
                                                               (0, len(q.scenes)))
        right += tasks.is_correct(q, g.answer)
        blind += tasks.is_correct(q, ask(model, variant, media_messages(q, blank=True)).answer)
        pages = [str(k + 1) for k in range(len(q.scenes))]
        formed += g.answer in pages if task == "page" else True
    model.media_settings = MediaSettings()
    if task == "page":
        assert formed >= 0.75 * len(qs), formed
    else:
        assert right >= MULTI_SHARE[task] * len(qs) and right >= blind + 3, (right, blind)


# ---------------------------------------------------------------------------------------------------------------
# Thinking


@pytest.fixture(scope="module")
def thinking(converted):
    text, mmproj = converted(CKPT["thinking"], "q8_0", "f16")
    with KimiVL.load(text, mmproj, kv_type="f32", n_ctx=2048, n_threads=1) as m:
        yield m


def _words(text: str) -> set[str]:
    return set(text.lower().replace(",", " ").replace(".", " ").split())


def test_thinking_reasoning_and_answer_split_streaming_and_not(thinking):
    """Count questions: the stream yields reasoning pieces, then answer pieces; they join to what generate() splits;
    the reasoning names each shape of the image (its colour and kind) before the answer gives the count (the count is
    right for 66 % of 600 held-out questions in the README; the listing is often one shape short)."""
    assert thinking.info.is_thinking
    qs = tasks.question_set(SEED + 10, 12, ("count",))
    named, right = 0, 0
    for q in qs:
        kinds = [p.kind for p in thinking.stream(q.messages(), temperature=0, max_tokens=160)]
        pieces = list(thinking.stream(q.messages(), temperature=0, max_tokens=160))
        assert [p.kind for p in pieces] == kinds
        assert kinds and kinds[0] == "reasoning" and "reasoning" not in kinds[kinds.index("answer"):]
        g = thinking.generate(q.messages(), temperature=0, max_tokens=160)
        assert g.text.startswith(THINK_OPEN) and THINK_CLOSE in g.text
        assert "".join(p.text for p in pieces if p.kind == "reasoning").strip() == g.reasoning
        assert "".join(p.text for p in pieces if p.kind == "answer").strip() == g.answer
        words = _words(g.reasoning or "")
        named += all(s.colour in words and s.kind in words for s in q.scenes[0].shapes)
        right += g.answer == str(len(q.scenes[0].shapes))
    assert named >= 0.25 * len(qs) and right >= 0.5 * len(qs), (named, right)


def test_thinking_history_is_what_it_was_trained_on(thinking):
    """A second turn: the runtime sends the earlier assistant turn as its answer only, and the prompt it builds is
    token for token the prefix the training encoded for that chat (training.train.Encoder, thinking)."""
    q = tasks.make_question(np.random.default_rng(SEED + 20), "count")
    s = q.scenes[0].shapes[0]
    turns = [(q.text, q.answer, q.thought), tasks.colour_turn(s)]
    enc = Encoder(CKPT["thinking"], thinking=True)
    ex = enc.encode(q.scenes, turns)
    first = thinking.generate(q.messages(), temperature=0, max_tokens=160)
    assert first.reasoning  # the model thought before answering
    msgs = q.messages() + [{"role": "assistant", "content": first.text}, {"role": "user", "content": turns[1][0]}]
    rendered = thinking.render_prompt(msgs)
    assert THINK_OPEN not in thinking.tokenizer.decode(rendered.ids)
    if first.answer == q.answer:  # the same answer as the training chat: the same tokens
        ids = expand_media(rendered.ids, rendered.media_pad_id, [im.n_rows for im in rendered.images])
        assert ids == ex.ids[:len(ids)] and ex.answer[len(ids)]
