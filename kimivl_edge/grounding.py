"""OS-agent grounding: the actions and boxes Kimi-VL writes, parsed and mapped to pixels of the user's image.

Kimi-VL answers grounding requests with PyAutoGUI code whose coordinates are normalized to 0-1, e.g.
``pyautogui.click(x=0.972, y=0.186)``, with bare points ``(x=0.5, y=0.5)`` / ``(0.5, 0.5)``, and with boxes
``{"bbox_2d": [x0, y0, x1, y1]}`` in 0-1 as well (Thinking models write the same after ``◁/think▷``).

Which frame is 0-1? The processor (docs/model.md §4) first shrinks the image uniformly to (⌊w·s⌋, ⌊h·s⌋) when it
exceeds the patch budget (§4.2), then zero-pads right and bottom to multiples of 28 (§4.3). Shrinking keeps
relative positions (up to one pixel of rounding), so "normalized to the resized image" and "normalized to the
original" are the same frame; the padding is not content and is not the image the task was posed on. ScreenSpot-Pro's
official evaluation asks for normalized coordinates and scores them against the *original* image size. So a point
(x, y) maps to (x·w, y·h) in pixels of the original w x h image, and the padded frame is not used. Had the model
meant the padded frame, a point would be off by at most 27 padded pixels at the far edge: for a 1920x1080
screenshot (resized to 1196x672, padded to 1204x672) x would be 0.7 % (13 original pixels) short at x = 1 and y exact.

Video frames and PDF pages are images made by ``kimivl_edge.media``. A frame is handed over already resized to its
per-frame patch cap (``VideoPlan.size``: 640x360 becomes 528x297), but its part carries the video's own size
(``source_size``), so points on a frame are in pixels of the video (the resize is uniform: the same frame). A PDF
page has no pixel size of its own: points are in pixels of the page as rendered.

``parse_actions`` never raises on model output: anything malformed (unbalanced parentheses, non-numbers, values
outside 0-1, a box whose corners are out of order, a missing coordinate) is left out, as a harness would score it
wrong. ``Action.image_index`` names the image the coordinates belong to: the last image of the prompt, the
screenshot an agent sends after its history.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import UsageError

# The model card's recommended prompt for OS-agent grounding (issue 17): "observe the screenshot and locate the
# following element by an action and coordinate point. <instruction> ...".
GROUND_PROMPT = "请观察屏幕截图，请通过操作和坐标点定位以下元素。<指令> "

# PyAutoGUI calls Kimi-VL writes, by kind: which keyword arguments hold the point.
POINTER_ACTIONS = ("click", "doubleClick", "rightClick", "moveTo", "dragTo", "scroll")
TEXT_ACTIONS = ("write", "typewrite")

Point = tuple[float, float]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Action:
    """One grounded action. ``points``/``boxes`` are pixels of the original image ``image_index`` (x right, y
    down, floats); ``normalized`` keeps the model's 0-1 values (points, then box corners, in order). ``kind`` is a
    PyAutoGUI name ("click", "doubleClick", "rightClick", "moveTo", "dragTo", "scroll", "write"), "point" for a
    bare (x, y), or "box" for a bbox_2d. ``text`` is what ``write`` types or a box's label; ``amount`` is scroll
    clicks."""

    kind: str
    points: tuple[Point, ...] = ()
    boxes: tuple[Box, ...] = ()
    text: str | None = None
    amount: float | None = None
    image_index: int = 0
    normalized: tuple[float, ...] = ()


def ground_prompt(instruction: str) -> str:
    """The recommended OS-agent prompt for ``instruction``."""
    if not instruction.strip():
        raise UsageError("the grounding instruction is empty")
    return GROUND_PROMPT + instruction.strip()


# ---------------------------------------------------------------------------------------------------------------
# Parsing (normalized coordinates)

_CALL = re.compile(r"pyautogui\s*\.\s*(\w+)\s*\(")
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_POINT = re.compile(rf"\(\s*(?:x\s*=\s*)?({_NUM})\s*,\s*(?:y\s*=\s*)?({_NUM})\s*\)")
_BOX = re.compile(r"[\"']bbox_2d[\"']\s*:\s*\[([^\]]*)\]")
_OBJECT = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class RawAction:
    """A parsed action in the model's 0-1 coordinates; ``at`` is where it starts in the answer."""

    at: int
    kind: str
    points: tuple[Point, ...] = ()
    boxes: tuple[Box, ...] = ()
    text: str | None = None
    amount: float | None = None


def parse_normalized(answer: str) -> list[RawAction]:
    """Every well-formed action, bare point and box of ``answer`` in text order, coordinates still 0-1."""
    found: list[RawAction] = []
    covered: list[tuple[int, int]] = []
    for m in _CALL.finditer(answer):
        end = _closing_paren(answer, m.end() - 1)
        if end is None:
            continue
        covered.append((m.start(), end + 1))
        raw = _call(m.start(), m.group(1), answer[m.end() - 1:end + 1])
        if raw is not None:
            found.append(raw)
    for m in _BOX.finditer(answer):
        box = _box(m.group(1))
        if box is not None:
            found.append(RawAction(m.start(), "box", boxes=(box,), text=_box_label(answer, m.start())))
        covered.append((m.start(), m.end()))
    for m in _POINT.finditer(answer):
        if any(a <= m.start() < b for a, b in covered):
            continue
        p = _point(m.group(1), m.group(2))
        if p is not None:
            found.append(RawAction(m.start(), "point", points=(p,)))
    return sorted(found, key=lambda r: r.at)


def _closing_paren(s: str, open_at: int) -> int | None:
    """Index of the parenthesis closing ``s[open_at]``, skipping quoted strings; None when unbalanced."""
    depth, quote, i = 0, "", open_at
    while i < len(s):
        c = s[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _call(at: int, name: str, arglist: str) -> RawAction | None:
    """``pyautogui.<name>(<args>)`` -> a RawAction, or None when the call is not a grounding action or is malformed."""
    try:
        node = ast.parse("f" + arglist, mode="eval").body
        assert isinstance(node, ast.Call)
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    except (SyntaxError, ValueError, TypeError, AssertionError, MemoryError, RecursionError):
        return None
    if name in TEXT_ACTIONS:
        text = kwargs.get("message", args[0] if args else None)
        return RawAction(at, "write", text=text) if isinstance(text, str) else None
    if name not in POINTER_ACTIONS:
        return None
    amount: float | None = None
    if name == "scroll":  # scroll(clicks, x=None, y=None)
        clicks = kwargs.pop("clicks") if "clicks" in kwargs else (args.pop(0) if args else None)
        if not isinstance(clicks, (int, float)) or isinstance(clicks, bool):
            return None
        amount = float(clicks)
        if not args and "x" not in kwargs:
            return RawAction(at, "scroll", amount=amount)  # scroll where the pointer is
    if args and isinstance(args[0], (tuple, list)):  # click((x, y))
        args = list(args[0]) + args[1:]
    x = kwargs.get("x", args[0] if args else None)
    y = kwargs.get("y", args[1] if len(args) > 1 else None)
    p = _point(x, y)
    if p is None:
        return None
    return RawAction(at, name, points=(p,), amount=amount)


def _point(x: object, y: object) -> Point | None:
    try:
        fx, fy = float(x), float(y)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if isinstance(x, bool) or isinstance(y, bool) or not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
        return None
    return fx, fy


def _box(body: str) -> Box | None:
    vals = [v.strip() for v in body.split(",")]
    if len(vals) != 4 or not all(re.fullmatch(_NUM, v) for v in vals):
        return None
    x0, y0, x1, y1 = (float(v) for v in vals)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        return None
    return x0, y0, x1, y1


def _box_label(answer: str, at: int) -> str | None:
    """The "label" of the JSON object holding the bbox_2d at ``at``, if that object parses."""
    for m in _OBJECT.finditer(answer):
        if m.start() <= at < m.end():
            try:
                label = json.loads(m.group(0)).get("label")
            except (json.JSONDecodeError, AttributeError):
                return None
            return label if isinstance(label, str) else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Mapping to pixels of the original image


def to_pixels(point: Point, size: tuple[int, int]) -> Point:
    """A 0-1 point -> pixels of the original w x h image (see the module docstring for why not the padded one)."""
    return point[0] * size[0], point[1] * size[1]


def parse_actions(answer: str, image_sizes: Sequence[tuple[int, int]]) -> list[Action]:
    """The grounded actions of ``answer`` in pixels of the last of ``image_sizes`` (original (w, h) of the prompt's
    images, in order). Without images, nothing can be grounded: an empty list."""
    if not image_sizes:
        return []
    index = len(image_sizes) - 1
    size = image_sizes[index]
    out = []
    for r in parse_normalized(answer):
        boxes = tuple(to_pixels(b[:2], size) + to_pixels(b[2:], size) for b in r.boxes)
        norm = tuple(v for p in r.points for v in p) + tuple(v for b in r.boxes for v in b)
        out.append(Action(r.kind, tuple(to_pixels(p, size) for p in r.points), boxes, r.text, r.amount, index,
                          norm))
    return out


def describe(action: Action) -> str:
    """One line for a terminal: kind, pixel points and boxes, text."""
    parts = [action.kind]
    parts += [f"({x:.0f}, {y:.0f})" for x, y in action.points]
    parts += [f"[{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]" for x0, y0, x1, y1 in action.boxes]
    if action.amount is not None:
        parts.append(f"amount {action.amount:g}")
    if action.text is not None:
        parts.append(repr(action.text))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def draw(image, actions: Sequence[Action], out: str | Path | None = None):
    """A copy of ``image`` (a path, bytes or PIL image: the original the actions were mapped to) with each point
    as a red cross in a circle and each box as a red rectangle; saved to ``out`` when given. Returns the copy."""
    from PIL import ImageDraw

    from .image import load_image

    img = load_image(image).convert("RGB")
    pen = ImageDraw.Draw(img)
    r = max(4, round(min(img.size) / 60))
    width = max(2, r // 3)
    for a in actions:
        for x, y in a.points:
            pen.ellipse((x - r, y - r, x + r, y + r), outline=(255, 0, 0), width=width)
            pen.line((x - 2 * r, y, x + 2 * r, y), fill=(255, 0, 0), width=width)
            pen.line((x, y - 2 * r, x, y + 2 * r), fill=(255, 0, 0), width=width)
        for box in a.boxes:
            pen.rectangle(box, outline=(255, 0, 0), width=width)
    if out is not None:
        try:
            img.save(out)
        except (OSError, ValueError) as e:
            raise UsageError(f"{out}: cannot write the drawing ({' '.join(str(e).split())})") from None
    return img


__all__ = ["Action", "RawAction", "GROUND_PROMPT", "ground_prompt", "parse_actions", "parse_normalized", "to_pixels",
           "describe", "draw"]
