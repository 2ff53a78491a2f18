"""Chat prompts and thinking-output splitting (docs/model.md §7.1, §7.4, §13.5).

Runtime module: jinja2 (a llama-cpp-python dependency) renders the checkpoint's own chat template in a sandbox, as
Hugging Face's ``apply_chat_template`` does. Images are written as one ``<|media_pad|>`` each; ``expand_media``
then repeats that id once per image token.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError, UsageError, read_json_object

if TYPE_CHECKING:
    from .image import ImageSource
    from .media import MediaSource

# §7.4: plain-text markers (several BPE tokens each) around the reasoning of Thinking models.
THINK_OPEN = "\u25c1think\u25b7"  # ◁think▷
THINK_CLOSE = "\u25c1/think\u25b7"  # ◁/think▷


# ---------------------------------------------------------------------------------------------------------------
# Chat template

def load_chat_template(ckpt_dir: str | Path) -> str:
    """The checkpoint's own template (§13.5): ``chat_template.jinja``, else tokenizer_config.json "chat_template"."""
    d = Path(ckpt_dir)
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    cfg_file = d / "tokenizer_config.json"
    if cfg_file.is_file():
        tpl = read_json_object(cfg_file).get("chat_template")
        if isinstance(tpl, list):  # HF's named-template form: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default")
        if isinstance(tpl, str) and tpl:
            return tpl
    raise CheckpointError(f"{d}: no chat template (neither chat_template.jinja nor tokenizer_config.json "
                          f"\"chat_template\")")


def _raise_exception(message: str) -> None:
    raise UsageError(f"chat template: {message}")


_COMPILED: dict[str, object] = {}


def _compile(template: str):
    """Compile once per template text, in the sandbox HF uses (trim_blocks, lstrip_blocks, loopcontrols)."""
    compiled = _COMPILED.get(template)
    if compiled is None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        try:
            compiled = env.from_string(template)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"chat template does not compile: {e}") from None
        _COMPILED[template] = compiled
    return compiled


def check_messages(messages: Sequence[dict]) -> None:
    """The one validation of a chat (OpenAI/HF style): a non-empty list of dicts with a string ``role`` and a
    ``content`` that is a string or a list of image parts and text parts; anything else is a one-line UsageError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UsageError(f"message {i}: needs a string 'role'")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise UsageError(f"message {i}: 'content' must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise UsageError(f"message {i} part {j}: must be a dict")
            if not is_image_part(part) and not isinstance(part.get("text"), str):
                raise UsageError(f"message {i} part {j}: neither an image part nor a text part with 'text'")


def render(template: str, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render ``messages`` (OpenAI/HF style; content = str or list of text/image parts) with ``template`` (§7.1).
    ``extra`` variables (e.g. bos_token) are passed to the template as HF does."""
    check_messages(messages)
    import jinja2

    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **extra)
    except jinja2.TemplateError as e:
        raise UsageError(f"chat template failed: {e}") from None


def render_marking_content(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                           **extra) -> tuple[str, list[tuple[int, int]]]:
    """``render``, and the character spans of the rendered text that hold message *content* (each string content
    and text part) rather than the template's own text. Each content string is rendered as an unguessable
    placeholder, then put back, so a template that writes content verbatim (Kimi's does) gives exactly ``render``'s
    text."""
    check_messages(messages)
    nonce = secrets.token_hex(8)
    texts: list[str] = []

    def mark(text: str) -> str:
        texts.append(text)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    masked = []
    for m in messages:
        c = m["content"]
        if isinstance(c, str):
            m = {**m, "content": mark(c)}
        else:
            m = {**m, "content": [p if is_image_part(p) else {**p, "text": mark(p["text"])} for p in c]}
        masked.append(m)
    rendered = render(template, masked, add_generation_prompt=add_generation_prompt, **extra)
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = length = 0
    for mt in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", rendered):
        text = texts[int(mt.group(1))]
        out += [rendered[pos:mt.start()], text]
        length += mt.start() - pos
        spans.append((length, length + len(text)))
        length += len(text)
        pos = mt.end()
    out.append(rendered[pos:])
    return "".join(out), spans


def is_image_part(part: dict) -> bool:
    """The §7.1 template's test for an image part."""
    return part.get("type") == "image" or "image" in part or "image_url" in part


def user_message(text: str, images: Iterable[ImageSource] = (), videos: Iterable[MediaSource] = (),
                 documents: Iterable[MediaSource] = (), pages: str | None = None) -> dict:
    """A user turn: its images, then its videos, then its documents (each with the page range ``pages``), one part
    each in order, then the text: media before the question, as Kimi-VL's processor lays images out (§7.1);
    without media the content is the plain string. Videos and documents become images in ``KimiVL.render_prompt``
    (kimivl_edge.media). MMLongBench-Doc's harness sends the question first; build the parts in that order to
    reproduce it."""
    parts: list[dict] = [{"type": "image", "image": im} for im in images]
    parts += [{"type": "video", "video": v} for v in videos]
    parts += [{"type": "document", "document": d, **({"pages": pages} if pages else {})} for d in documents]
    if not parts:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def image_parts(messages: Sequence[dict]) -> list[dict]:
    """Image parts in textual order (the order of the <|media_pad|> ids in the rendered prompt)."""
    return [p for m in messages if isinstance(m.get("content"), (list, tuple))
            for p in m["content"] if isinstance(p, dict) and is_image_part(p)]


def count_images(messages: Sequence[dict]) -> int:
    return len(image_parts(messages))


def expand_media(ids: Sequence[int], media_pad_id: int, tokens_per_image: Sequence[int]) -> list[int]:
    """Replace the k-th ``media_pad_id`` by ``tokens_per_image[k]`` copies of it (§7.1: one row per image token)."""
    n_pads = sum(1 for t in ids if t == media_pad_id)
    if n_pads != len(tokens_per_image):
        raise UsageError(f"prompt has {n_pads} <|media_pad|> token(s) but {len(tokens_per_image)} image(s) were "
                         f"given (a literal <|media_pad|> in the text also counts)")
    if any(int(n) < 1 for n in tokens_per_image):
        raise UsageError(f"every image needs at least one token, got {list(tokens_per_image)}")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == media_pad_id:
            out.extend([t] * int(tokens_per_image[k]))
            k += 1
        else:
            out.append(t)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Thinking output (§7.4)

def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a finished output, the model-card helper made total (§7.4):
    - ◁/think▷ present: reasoning = text after the first ◁think▷ before it (or from the start) up to it,
      answer = text after it;
    - only ◁think▷: truncated reasoning (text after it), empty answer;
    - neither: reasoning None, all text is the answer.
    Both parts are stripped of surrounding whitespace. It is ``ThinkingStreamSplitter`` run over the whole text, so
    a streamed output splits exactly the same way."""
    split = ThinkingStreamSplitter()
    events = split.feed(text) + split.flush()
    reasoning = "".join(t for k, t in events if k == "reasoning")
    return (reasoning if split.has_reasoning else None), "".join(t for k, t in events if k == "answer")


class _Stripped:
    """Streams one section with its leading whitespace dropped and trailing whitespace held until more text comes,
    so the concatenated output equals the section's ``str.strip()``."""

    def __init__(self) -> None:
        self._started = False
        self._pending = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._pending + text
        body = text.rstrip()
        self._pending = text[len(body):]
        return body


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ThinkingStreamSplitter:
    """Streaming split of decoded model output into ("reasoning" | "answer", text) events (§7.4); the joined events
    equal ``split_thinking`` for every output (it is defined by this class).

    Until a marker is seen the output cannot be classified, so it is held back: text before ◁think▷ is dropped, text
    before a lone ◁/think▷ is reasoning, output with no marker at all is answer, released at ``flush``. Kimi's
    thinking models write ◁think▷ first (§7.4), so their reasoning streams from the start. Inside the reasoning at
    most 7 characters (a possible partial ◁/think▷) are held back, plus whitespace that might turn out to be
    trailing. ``has_reasoning``: a marker opened a reasoning part; ``reasoning_unfinished``: it never closed (the
    output was cut, e.g. by max_tokens).
    """

    def __init__(self) -> None:
        self._state = "undecided"  # undecided -> reasoning -> answer, undecided -> answer, or undecided to the end
        self._buf = ""
        self._sections = {"reasoning": _Stripped(), "answer": _Stripped()}
        self.has_reasoning = False

    @property
    def reasoning_unfinished(self) -> bool:
        return self._state == "reasoning"

    def feed(self, chunk: str) -> list[tuple[str, str]]:
        """Consume one decoded chunk; return the events it completes."""
        self._buf += chunk
        events: list[tuple[str, str]] = []
        while self._step(events):
            pass
        return events

    def flush(self) -> list[tuple[str, str]]:
        """End of output: release everything held back (a partial marker is plain text; no marker: answer)."""
        events: list[tuple[str, str]] = []
        kind = "reasoning" if self._state == "reasoning" else "answer"
        self._emit(events, kind, self._buf)
        self._buf = ""
        return events

    def _step(self, events: list[tuple[str, str]]) -> bool:
        """Advance the state machine once; False when more input is needed."""
        if self._state == "undecided":
            close = self._buf.find(THINK_CLOSE)
            open_ = self._buf.find(THINK_OPEN, 0, close if close >= 0 else len(self._buf))
            if open_ >= 0:  # a ◁/think▷ before it would have been complete (the markers cannot overlap)
                self._buf = self._buf[open_ + len(THINK_OPEN):]
                self._state, self.has_reasoning = "reasoning", True
                return True
            if close >= 0:
                self.has_reasoning = True
                self._emit(events, "reasoning", self._buf[:close])
                self._buf = self._buf[close + len(THINK_CLOSE):]
                self._state = "answer"
                return True
            return False
        if self._state == "reasoning":
            close = self._buf.find(THINK_CLOSE)
            if close >= 0:
                self._emit(events, "reasoning", self._buf[:close])
                self._buf = self._buf[close + len(THINK_CLOSE):]
                self._state = "answer"
                return True
            keep = _partial_marker_len(self._buf, THINK_CLOSE)
            self._emit(events, "reasoning", self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._emit(events, "answer", self._buf)
        self._buf = ""
        return False

    def _emit(self, events: list[tuple[str, str]], kind: str, text: str) -> None:
        out = self._sections[kind].push(text)
        if not out:
            return
        if events and events[-1][0] == kind:
            events[-1] = (kind, events[-1][1] + out)
        else:
            events.append((kind, out))
