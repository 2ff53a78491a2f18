"""Chat-prompt rendering, media expansion and thinking splitting against docs/model.md §7.1 / §7.4."""
from __future__ import annotations

import json

import pytest

from kimivl_edge.errors import CheckpointError, KimiVLError
from kimivl_edge.prompt import (
    ThinkingStreamSplitter,
    count_images,
    expand_media,
    load_chat_template,
    render,
    split_thinking,
    user_message,
)
from kimivl_edge.synth import KIMI_VL_CHAT_TEMPLATE

# §7.1, copied from docs/model.md: the rendered example.
DOME_EXPECTED = (
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>"
    "<|media_start|>image<|media_content|><|media_pad|><|media_end|>What is the dome building in the picture?"
    "<|im_end|><|im_assistant|>assistant<|im_middle|>"
)
DOME_MESSAGES = [{"role": "user", "content": [
    {"type": "image", "image": "demo.jpeg"},
    {"type": "text", "text": "What is the dome building in the picture?"},
]}]

OPEN, CLOSE = "\u25c1think\u25b7", "\u25c1/think\u25b7"


def test_template_is_the_doc_template():
    # Independent anchors from §7.1: the default system prompt has no final period; no newline is rendered.
    assert "You are a helpful assistant<|im_end|>" in KIMI_VL_CHAT_TEMPLATE
    assert "{{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}" in KIMI_VL_CHAT_TEMPLATE


def test_dome_example():
    out = render(KIMI_VL_CHAT_TEMPLATE, DOME_MESSAGES)
    assert out == DOME_EXPECTED
    assert "\n" not in out


def test_no_generation_prompt():
    out = render(KIMI_VL_CHAT_TEMPLATE, DOME_MESSAGES, add_generation_prompt=False)
    assert out == DOME_EXPECTED[: -len("<|im_assistant|>assistant<|im_middle|>")]


def test_system_message_replaces_default():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render(KIMI_VL_CHAT_TEMPLATE, msgs) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_string_and_list_content_agree():
    s = render(KIMI_VL_CHAT_TEMPLATE, [{"role": "user", "content": "Hello there"}])
    parts = render(KIMI_VL_CHAT_TEMPLATE, [{"role": "user", "content": [
        {"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    assert s == parts == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
                          "<|im_user|>user<|im_middle|>Hello there<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_multi_turn_and_two_images():
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "image_url", "image_url": "b"}]},
    ]
    media = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    assert render(KIMI_VL_CHAT_TEMPLATE, msgs) == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
        f"<|im_user|>user<|im_middle|>{media}A?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>yes<|im_end|>"
        f"<|im_user|>user<|im_middle|>and {media}<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>")
    assert count_images(msgs) == 2
    assert count_images([{"role": "user", "content": "no images <|media_pad|>"}]) == 0


def test_user_message_is_the_processor_layout():
    # images first, then the text (the §7.1 example's message); without images a plain string
    assert [user_message("What is the dome building in the picture?", ["demo.jpeg"])] == DOME_MESSAGES
    assert render(KIMI_VL_CHAT_TEMPLATE, [user_message("What is the dome building in the picture?", ["x"])]) == \
        DOME_EXPECTED
    assert user_message("Hi") == {"role": "user", "content": "Hi"}
    two = user_message("Which?", iter(["a", "b"]))
    assert [p.get("image") for p in two["content"]] == ["a", "b", None] and two["content"][2]["text"] == "Which?"
    assert count_images([two]) == 2


@pytest.mark.parametrize("bad", [[], [{"content": "x"}], [{"role": "user", "content": 3}],
                                 [{"role": "user", "content": [{"type": "text"}]}]])
def test_bad_messages_rejected(bad):
    with pytest.raises(KimiVLError):
        render(KIMI_VL_CHAT_TEMPLATE, bad)


def test_load_chat_template(tmp_path):
    with pytest.raises(CheckpointError):
        load_chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from-config"}))
    assert load_chat_template(tmp_path) == "from-config"
    (tmp_path / "chat_template.jinja").write_text("from-file")
    assert load_chat_template(tmp_path) == "from-file"


def test_expand_media():
    pad = 99
    ids = [1, pad, 2, 3, pad, 4]
    assert expand_media(ids, pad, [3, 1]) == [1, pad, pad, pad, 2, 3, pad, 4]
    assert expand_media([5, 6], pad, []) == [5, 6]
    with pytest.raises((KimiVLError, ValueError), match="2 <\\|media_pad\\|>"):
        expand_media(ids, pad, [3])
    with pytest.raises((KimiVLError, ValueError)):
        expand_media(ids, pad, [1, 2, 3])


# §7.4 cases: (text, expected reasoning, expected answer)
THINK_CASES = [
    (f"{OPEN}Let me look.\nIt is a dome.{CLOSE}The Capitol.", "Let me look.\nIt is a dome.", "The Capitol."),
    (f"  {OPEN}  a b  {CLOSE}  answer  ", "a b", "answer"),
    (f"{OPEN}still thinking ...", "still thinking ...", ""),                  # truncated: no answer
    ("plain answer", None, "plain answer"),                                      # neither marker
    (f"no open tag{CLOSE}ans", "no open tag", "ans"),                            # from the start
    (f"a{CLOSE}b{OPEN}c", "a", f"b{OPEN}c"),                                     # an open after the close
    (f"{OPEN}x{CLOSE}y{CLOSE}z", "x", f"y{CLOSE}z"),                             # answer = all after the first
    (f"{OPEN}x{OPEN}y{CLOSE}z", f"x{OPEN}y", "z"),                               # after the FIRST open
    (f"{OPEN}{CLOSE}", "", ""),
    (f"{OPEN}a {chr(0x25c1)}/thin", f"a {chr(0x25c1)}/thin", ""),                # partial close = text
]


@pytest.mark.parametrize("text,reasoning,answer", THINK_CASES)
def test_split_thinking(text, reasoning, answer):
    assert split_thinking(text) == (reasoning, answer)


def _stream(chunks: list[str]) -> tuple[str | None, str, list[tuple[str, str]]]:
    sp = ThinkingStreamSplitter()
    events = []
    for c in chunks:
        events += sp.feed(c)
    events += sp.flush()
    reasoning = "".join(t for k, t in events if k == "reasoning")
    answer = "".join(t for k, t in events if k == "answer")
    return (reasoning if sp.has_reasoning else None), answer, events


# Streaming splits every output as split_thinking does (text before a marker is held back until one decides it).
STREAM_CASES = THINK_CASES + [
    (f"{OPEN}\u4e2d\u6587 r{CLOSE}\u7b54 {OPEN}", "\u4e2d\u6587 r", f"\u7b54 {OPEN}"),
    ("\u25c1thin", None, "\u25c1thin"),                                         # partial open at the end
    (f"\u25c1thinx {CLOSE[:3]}", None, f"\u25c1thinx {CLOSE[:3]}"),
]


@pytest.mark.parametrize("text,reasoning,answer", STREAM_CASES)
def test_stream_splitter_every_boundary(text, reasoning, answer):
    assert split_thinking(text) == (reasoning, answer)
    for i in range(len(text) + 1):
        assert _stream([text[:i], text[i:]])[:2] == (reasoning, answer), i
        for j in range(i, len(text) + 1):
            r, a, events = _stream([text[:i], text[i:j], text[j:]])
            assert (r, a) == (reasoning, answer), (i, j)
            assert all(CLOSE not in t for k, t in events if k == "reasoning")
    r, a, _ = _stream(list(text))  # one character at a time
    assert (r, a) == (reasoning, answer)


def test_stream_never_leaks_partial_marker():
    sp = ThinkingStreamSplitter()
    out = sp.feed(OPEN + "abc")
    out += sp.feed(CLOSE[:4])  # '◁/th' may be the start of the close marker: must be held back
    assert out == [("reasoning", "abc")]
    assert sp.feed(CLOSE[4:] + "ok") == [("answer", "ok")]
    # holdback is bounded: at most 7 characters are kept while reasoning
    sp = ThinkingStreamSplitter()
    out = sp.feed(OPEN + "abcdefghij" + CLOSE[:7])
    assert out == [("reasoning", "abcdefghij")]
