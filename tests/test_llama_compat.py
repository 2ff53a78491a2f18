"""What llama.cpp's own multimodal path (libmtmd, used by llama-mtmd-cli and llama-server) does with our files.

On the trained tiny checkpoint converted by our converter, through llama-cpp-python's ``libmtmd`` (training.llama_compat
drives it the way llama-mtmd-cli does) and llama.cpp's built-in chat template code:

- framing: libmtmd wraps an image as ``<|media_start|>`` image ``<|media_end|>``, without the chat template's
  ``image<|media_content|>`` text, which our runtime's prompt has (docs/model.md §7.1, §10.2d);
- size: libmtmd resizes an image to multiples of 28 (rounded to the nearest, 8..1024 tokens) where the HF processor
  pads (§4, §10.2c); token counts checked against both rules, written out here;
- system turn: llama.cpp's non-jinja template for this family has no default system turn.

The accuracy these cost is measured by ``python -m training.llama_compat`` (README "Compatibility notes").
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from kimivl_edge.convert import convert_checkpoint
from kimivl_edge.image import preprocess
from kimivl_edge.model import KimiVL
from kimivl_edge.prompt import render
from training.evaluate import EVAL_SEED
from training.llama_compat import TEMPLATE_IMAGE_TEXT, Mtmd, counts, jinja_prompt, measure, media_marker
from training.tasks import SINGLE_TASKS, question_set

ASSET = Path(__file__).resolve().parent.parent / "kimivl_edge" / "assets" / "kimi-vl-tiny"
PATCH, MERGE = 14, 2
SIDE = PATCH * MERGE  # 28 pixels per merged token side
SIZES = [(300, 200), (100, 60), (40, 40), (1200, 1000)]  # (w, h): none has both sides multiples of 28


def hf_tokens(w: int, h: int, token_limit: int) -> int:
    """Reference doc §4: shrink only if (w//14)(h//14) > L (by sqrt(L/P), floored), then zero-pad to multiples of 28;
    tokens = (W/14)(H/14)/4."""
    p = (w // PATCH) * (h // PATCH)
    if p > token_limit:
        s = math.sqrt(token_limit / p)
        w, h = math.floor(w * s), math.floor(h * s)
    return math.ceil(w / SIDE) * math.ceil(h / SIDE)


def llama_tokens(w: int, h: int, min_tokens: int = 8, max_tokens: int = 1024) -> int:
    """llama.cpp's Kimi-VL rule (``set_limit_image_tokens(8, 1024)`` and the dyn-size preprocessor's smart resize,
    docs/model.md §10.2c): each side rounded to the nearest multiple of 28 (at least 28); if the area leaves
    [min, max] tokens, scale both sides by sqrt(area ratio) and floor (too big) or ceil (too small) to 28."""
    def rnd(x: float) -> int:
        return max(SIDE, math.floor(x / SIDE + 0.5) * SIDE)  # C's round: halves away from zero

    lo, hi = min_tokens * SIDE * SIDE, max_tokens * SIDE * SIDE
    ww, hh = rnd(w), rnd(h)
    if ww * hh > hi:
        beta = math.sqrt(w * h / hi)
        ww, hh = max(SIDE, math.floor(w / beta / SIDE) * SIDE), max(SIDE, math.floor(h / beta / SIDE) * SIDE)
    elif ww * hh < lo:
        beta = math.sqrt(lo / (w * h))
        ww, hh = math.ceil(w * beta / SIDE) * SIDE, math.ceil(h * beta / SIDE) * SIDE
    return (ww // SIDE) * (hh // SIDE)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    text, mmproj = convert_checkpoint(ASSET, "q8_0", "f16", tmp_path_factory.mktemp("compat"))  # the script's files
    return Path(text), Path(mmproj)


@pytest.fixture(scope="module")
def ours(pair: tuple[Path, Path]) -> Iterator[KimiVL]:
    with KimiVL.load(pair[0], pair[1], n_ctx=1024, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def mtmd(pair: tuple[Path, Path]) -> Iterator[Mtmd]:
    with Mtmd(pair[0], pair[1], threads=1) as m:
        yield m


def one_id(model: KimiVL, special: str) -> int:
    ids = model.tokenize(special)
    assert len(ids) == 1, f"{special} is not one token: {ids}"
    return ids[0]


def image(w: int = 300, h: int = 200) -> Image.Image:
    return Image.new("RGB", (w, h), (230, 240, 250))


def test_libmtmd_frames_an_image_without_the_template_text(ours: KimiVL, mtmd: Mtmd) -> None:
    start, end = one_id(ours, "<|media_start|>"), one_id(ours, "<|media_end|>")
    content = one_id(ours, "<|media_content|>")
    chunks = mtmd.chunks(f"Look: {media_marker()} What?", [image()])
    assert [c.kind for c in chunks] == ["text", "image", "text"]
    before, img, after = chunks
    assert list(before.tokens) == ours.tokenize("Look: ") + [start]
    assert list(after.tokens) == [end] + ours.tokenize(" What?")
    assert img.n_tokens == img.nx * img.ny > 0
    assert content not in before.tokens + after.tokens

    # our runtime's prompt has the template's framing: <|media_start|> image <|media_content|> <|media_pad|> ...
    msgs = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What?"}]}]
    ids = ours.tokenize(render(ours.info.chat_template, msgs))
    framing = [start] + ours.tokenize(TEMPLATE_IMAGE_TEXT) + [one_id(ours, "<|media_pad|>"), end]
    assert ours.tokenize(TEMPLATE_IMAGE_TEXT)[-1] == content
    assert any(ids[i:i + len(framing)] == framing for i in range(len(ids)))


def test_jinja_prompt_through_libmtmd_differs_only_by_the_template_text(ours: KimiVL, mtmd: Mtmd) -> None:
    """The whole --jinja prompt of a two-image question: libmtmd's ids are ours minus ``image<|media_content|>``
    before each image (images compared as one placeholder each, their sizes differ: next test)."""
    msgs = [{"role": "user", "content": [{"type": "image", "image": image()}, {"type": "image", "image": image()},
                                         {"type": "text", "text": "Which image has more shapes?"}]}]
    pad, template_text = one_id(ours, "<|media_pad|>"), ours.tokenize(TEMPLATE_IMAGE_TEXT)
    ids = ours.tokenize(render(ours.info.chat_template, msgs))
    chunks = mtmd.chunks(jinja_prompt(mtmd.chat_template(), msgs, media_marker()), [image(), image()])
    theirs = [t for c in chunks for t in (c.tokens if c.kind == "text" else (pad,))]
    stripped = list(ids)
    for _ in range(2):
        i = next(k for k in range(len(stripped)) if stripped[k:k + len(template_text) + 1] == template_text + [pad])
        del stripped[i:i + len(template_text)]
    assert theirs != ids
    assert theirs == stripped

    # the workaround puts the text back, before libmtmd's <|media_start|> (the template has it after)
    chunks = mtmd.chunks(jinja_prompt(mtmd.chat_template(), msgs, TEMPLATE_IMAGE_TEXT + media_marker()),
                         [image(), image()])
    assert chunks[0].kind == "text" and chunks[1].kind == "image"
    tail = template_text + [one_id(ours, "<|media_start|>")]
    assert list(chunks[0].tokens[-len(tail):]) == tail


@pytest.mark.parametrize("w,h", SIZES)
def test_libmtmd_resizes_where_hf_pads(ours: KimiVL, mtmd: Mtmd, w: int, h: int) -> None:
    chunks = mtmd.chunks(media_marker(), [image(w, h)])
    (img,) = [c for c in chunks if c.kind == "image"]
    assert img.n_tokens == img.nx * img.ny == llama_tokens(w, h)

    cfg = ours.image_config
    assert cfg is not None
    _, grid = preprocess([image(w, h)], cfg)
    gh, gw = (int(v) for v in grid[0])
    assert gh * gw // (MERGE * MERGE) == hf_tokens(w, h, cfg.in_token_limit)
    assert llama_tokens(w, h) != hf_tokens(w, h, cfg.in_token_limit)


def test_resize_rule_values() -> None:
    """The two rules worked by hand (300x200: 11x7 rounded vs 11x8 padded; 40x40 hits llama.cpp's 8-token floor;
    1200x1000 its 1024-token ceiling and HF's 4096-patch limit)."""
    assert [llama_tokens(w, h) for w, h in SIZES] == [77, 8, 9, 1015]
    assert [hf_tokens(w, h, 4096) for w, h in SIZES] == [88, 12, 4, 1080]


def test_legacy_template_has_no_default_system_turn(ours: KimiVL, mtmd: Mtmd) -> None:
    """llama-mtmd-cli without --jinja renders with llama.cpp's built-in template (llama_chat_apply_template): no
    system turn. The GGUF's own template (--jinja, our runtime) starts with the default one (docs/model.md §7.1)."""
    user = "<__media__>What colour is the circle?"
    assert mtmd.legacy_prompt([("user", user)]) == (
        f"<|im_user|>user<|im_middle|>{user}<|im_end|><|im_assistant|>assistant<|im_middle|>")
    ours_text = render(ours.info.chat_template, [{"role": "user", "content": user}])
    assert ours_text == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
                         f"<|im_user|>user<|im_middle|>{user}<|im_end|><|im_assistant|>assistant<|im_middle|>")
    assert mtmd.chat_template() == ours.info.chat_template


def test_measured_counts(pair: tuple[Path, Path]) -> None:
    """The README's figures, 35 held-out questions (5 per single-image task and compare, seed 1000): our runtime
    27-31 right (28 measured), libmtmd's --jinja framing 22-26 (22), at least 3 fewer than ours, and fewer grounding
    clicks on the shape (it resizes where the processor pads) (``python -m training.llama_compat --n 35`` prints
    the full table)."""
    questions = question_set(EVAL_SEED, 35, SINGLE_TASKS)
    c = counts(questions, measure(pair[0], pair[1], questions))
    assert c["questions"]["compare"] == 5 and c["questions"]["ground"] == 5
    assert 27 <= c["kimivl-edge"]["all"] <= 31
    assert 22 <= c["llama.cpp --jinja"]["all"] <= 26
    assert c["kimivl-edge"]["all"] >= c["llama.cpp --jinja"]["all"] + 3
    assert c["kimivl-edge"]["ground"] > c["llama.cpp --jinja"]["ground"]
