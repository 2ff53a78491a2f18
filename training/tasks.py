"""The synthetic visual task of the trained tiny Kimi-VL: Pillow scenes, chat questions, answers, a checker.

A scene is 1-3 coloured shapes (distinct kinds and colours, so "the circle" and "the red one" are unambiguous) on a
plain light background, or a rendered two-digit number. Colour, shape and side questions are asked about a single,
larger shape (SINGLE_RADIUS); counting and comparison scenes hold 1-3 shapes (RADIUS_RANGE). Image sizes are
random in SIZE_RANGE (non-square, most not multiples of 28), so the preprocessing pads them and the 16x16 pos-emb
table is resampled to 6..12-patch grids.

Tasks (every answer is short and ends, in the chat template, with <|im_end|>):
    colour  "What colour is the circle?"                       -> red | green | blue | yellow | purple | orange
    shape   "What shape is the red one?"                       -> circle | square | triangle | star
    count   "How many shapes are there?"                       -> 1 | 2 | 3
    side    "Is the red circle on the left or the right?"      -> left | right
    compare (two images) "Which image has more shapes?"        -> first | second
    point   "Where is the red circle? Answer with a point (x, y)." -> "(x, y)" in image pixels, correct if inside
    read    "What number is written in the image?"             -> 10..99
"read" (EXTRA_TASKS) is generated and checked but not in the shipped model's training mix (not tried). Point
questions name one of 1-3 shapes; in training chats, 2-3-shape scenes also ask the colour or kind of a named shape,
the same look-up without coordinates (the held-out colour and shape questions stay one-shape).

Everything is a pure function of a numpy Generator, so a seed fixes the data exactly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kimivl_edge.prompt import user_message

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
    "yellow": (235, 200, 0), "purple": (140, 40, 180), "orange": (245, 130, 0),
}
KINDS = ("circle", "square", "triangle", "star")
TASKS = ("colour", "shape", "count", "side", "compare", "point")  # trained and evaluated (the shipped asset)
EXTRA_TASKS = ("read",)  # generated and checked, not in the shipped asset's training mix
SIZE_RANGE = (84, 154)  # inclusive range of image widths and heights, in pixels (6..12-patch grids)
RADIUS_RANGE = (14, 22)  # shape circumradius; >= 14 keeps a 5-pixel-rounded centre inside every kind
SINGLE_RADIUS = (18, 26)  # one-shape scenes (colour, shape, side): larger, so the kind spans 2-4 patches a side
SINGLE_SHARE = 0.6  # share of one-shape chats among the chats that are neither compare nor warm-up ...
SINGLE_SHARE_POINT = 0.5  # ... and when "point" is trained
POINT_STEP = 5  # point answers are the centre rounded to this many pixels
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(KINDS), "count": 1 / 3, "side": 1 / 2, "compare": 1 / 2,
          "read": 1 / 90}  # "point": the area fraction of the shape, computed per question


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: int
    cy: int
    r: int


@dataclass
class Scene:
    """One image: its size, background and either shapes or a number."""

    width: int
    height: int
    background: tuple[int, int, int]
    shapes: list[Shape] = field(default_factory=list)
    number: int | None = None
    number_colour: tuple[int, int, int] = (0, 0, 0)

    def render(self, blank: bool = False) -> Image.Image:
        """The RGB image; ``blank`` keeps only the background (the blind baseline's image)."""
        img = Image.new("RGB", (self.width, self.height), self.background)
        if blank:
            return img
        d = ImageDraw.Draw(img)
        for s in self.shapes:
            draw_shape(d, s, COLOURS[s.colour])
        if self.number is not None:
            font = number_font(self.height)
            text = str(self.number)
            x0, t, r, b = d.textbbox((0, 0), text, font=font)
            d.text(((self.width - (r - x0)) / 2 - x0, (self.height - (b - t)) / 2 - t), text, font=font,
                   fill=self.number_colour)
        return img


@dataclass
class Question:
    """A question about one or two scenes, its reference answer and its task name."""

    task: str
    scenes: list[Scene]
    text: str
    answer: str
    target: Shape | None = None  # the shape a "point" question asks about

    def messages(self, blank: bool = False) -> list[dict]:
        """A one-turn chat: the images first, then the question text (Kimi-VL's message format)."""
        return [user_message(self.text, [s.render(blank) for s in self.scenes])]


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def shape_polygon(s: Shape) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for the circle); all are inscribed in the circle (cx, cy, r)."""
    if s.kind == "circle":
        return None
    if s.kind == "square":
        a = s.r / math.sqrt(2)
        return [(s.cx - a, s.cy - a), (s.cx + a, s.cy - a), (s.cx + a, s.cy + a), (s.cx - a, s.cy + a)]
    if s.kind == "triangle":
        return [(s.cx + s.r * math.cos(t), s.cy - s.r * math.sin(t))
                for t in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    if s.kind == "star":
        pts = []
        for k in range(10):
            rad = s.r if k % 2 == 0 else 0.5 * s.r
            t = math.pi / 2 + k * math.pi / 5
            pts.append((s.cx + rad * math.cos(t), s.cy - rad * math.sin(t)))
        return pts
    raise ValueError(s.kind)


def draw_shape(d: ImageDraw.ImageDraw, s: Shape, fill: tuple[int, int, int] | int) -> None:
    poly = shape_polygon(s)
    if poly is None:
        d.ellipse((s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r), fill=fill)
    else:
        d.polygon(poly, fill=fill)


def shape_mask(s: Shape, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] mask of the pixels the shape covers (rendered exactly as in the image)."""
    m = Image.new("L", (width, height), 0)
    draw_shape(ImageDraw.Draw(m), s, 255)
    return np.asarray(m) > 0


_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def number_font(height: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (no system font needed), about half the image height."""
    size = max(24, int(height * 0.5))
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


# ---------------------------------------------------------------------------------------------------------------
# Scene generation


def _size(rng: np.random.Generator) -> tuple[int, int]:
    lo, hi = SIZE_RANGE
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(225, 256, size=3))


def shape_scene(rng: np.random.Generator, n: int, side_of_first: str | None = None,
                radius: tuple[int, int] = RADIUS_RANGE) -> Scene:
    """A scene with ``n`` non-overlapping shapes of distinct kinds and colours; if ``side_of_first`` is given, the
    first shape's centre lies in the outer 40 % of that side (so "left or right" has a clear answer)."""
    while True:
        w, h = _size(rng)
        kinds = rng.permutation(len(KINDS))[:n]
        colours = rng.permutation(len(COLOURS))[:n]
        names = list(COLOURS)
        shapes: list[Shape] = []
        for k in range(n):
            r = int(rng.integers(radius[0], radius[1] + 1))
            x_lo, x_hi = r + 2, w - r - 3
            if k == 0 and side_of_first == "left":
                x_hi = min(x_hi, int(0.4 * w))
            elif k == 0 and side_of_first == "right":
                x_lo = max(x_lo, int(0.6 * w) + 1)
            if x_hi < x_lo:
                break
            for _ in range(50):
                cx = int(rng.integers(x_lo, x_hi + 1))
                cy = int(rng.integers(r + 2, h - r - 2))
                if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.r + 4) ** 2 for o in shapes):
                    shapes.append(Shape(KINDS[kinds[k]], names[colours[k]], cx, cy, r))
                    break
            else:
                break
        if len(shapes) == n:
            return Scene(w, h, _background(rng), shapes)


def number_scene(rng: np.random.Generator) -> Scene:
    w, h = _size(rng)
    colour = tuple(int(v) for v in rng.integers(0, 90, size=3))
    return Scene(w, h, _background(rng), number=int(rng.integers(10, 100)), number_colour=colour)


# ---------------------------------------------------------------------------------------------------------------
# Questions


def point_text(s: Shape) -> str:
    """The reference answer of a point question: the centre rounded to POINT_STEP pixels."""
    q = POINT_STEP
    return f"({int(round(s.cx / q)) * q}, {int(round(s.cy / q)) * q})"


def point_turn(s: Shape) -> tuple[str, str]:
    """The (question, answer) of a point question about shape ``s``."""
    return f"Where is the {s.colour} {s.kind}? Answer with a point (x, y).", point_text(s)


def colour_turn(s: Shape) -> tuple[str, str]:
    return f"What colour is the {s.kind}?", s.colour


def shape_turn(s: Shape) -> tuple[str, str]:
    return f"What shape is the {s.colour} one?", s.kind


def side_turn(s: Shape, side: str) -> tuple[str, str]:
    return f"Is the {s.colour} {s.kind} on the left or the right?", side


def make_question(rng: np.random.Generator, task: str) -> Question:
    """One question of ``task`` with balanced answers."""
    if task == "count":
        n = int(rng.integers(1, 4))
        return Question(task, [shape_scene(rng, n)], "How many shapes are there?", str(n))
    if task == "compare":
        a, b = (int(v) + 1 for v in rng.permutation(3)[:2])
        return Question(task, [shape_scene(rng, a), shape_scene(rng, b)], "Which image has more shapes?",
                        "first" if a > b else "second")
    if task == "read":
        sc = number_scene(rng)
        return Question(task, [sc], "What number is written in the image?", str(sc.number))
    if task == "side":
        side = ("left", "right")[int(rng.integers(2))]
        sc = shape_scene(rng, 1, side_of_first=side, radius=SINGLE_RADIUS)
        s = sc.shapes[0]
        return Question(task, [sc], *side_turn(s, side))
    if task == "point":
        n = int(rng.integers(1, 4))
        sc = shape_scene(rng, n)
        s = sc.shapes[int(rng.integers(n))]
    else:
        sc = shape_scene(rng, 1, radius=SINGLE_RADIUS)
        s = sc.shapes[0]
    if task == "colour":
        return Question(task, [sc], *colour_turn(s))
    if task == "shape":
        return Question(task, [sc], *shape_turn(s))
    if task == "point":
        return Question(task, [sc], *point_turn(s), target=s)
    raise ValueError(f"unknown task {task!r}")


def question_set(seed: int, n: int, tasks: tuple[str, ...] = TASKS) -> list[Question]:
    """``n`` questions cycling through ``tasks`` in order, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_question(rng, tasks[i % len(tasks)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Checking

_POINT_RE = re.compile(r"^\s*\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)\s*$")


def parse_point(text: str) -> tuple[int, int] | None:
    m = _POINT_RE.match(text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_correct(q: Question, answer: str) -> bool:
    """Exact match (whitespace and case ignored), except point answers: right if the pixel lies inside the shape."""
    if q.task == "point":
        p = parse_point(answer)
        if p is None or q.target is None:
            return False
        x, y = p
        sc = q.scenes[0]
        return 0 <= x < sc.width and 0 <= y < sc.height and bool(shape_mask(q.target, sc.width, sc.height)[y, x])
    return answer.strip().lower() == q.answer.lower()


def chance(q: Question) -> float:
    """Expected accuracy of a guess that ignores the image: 1/(number of answers), the shape's area for points."""
    if q.task == "point":
        sc = q.scenes[0]
        return float(shape_mask(q.target, sc.width, sc.height).mean())
    return CHANCE[q.task]


def make_conversation(rng: np.random.Generator, warmup: bool = False, tasks: tuple[str, ...] = TASKS
                      ) -> tuple[list[Scene], list[tuple[str, str]]]:
    """A training chat: scenes and (question, answer) turns about them. A one-shape scene asks 2-4 questions of one
    image (count, colour, shape, side, point), so one vision pass supervises several answers; a 2-3-shape scene asks
    the count (and, if "point" is trained, where each shape is, its colour and its kind); 20 % of chats compare two
    images. The first turn has exactly the form of a held-out question. ``warmup`` (the start of training): one
    shape, its colour, kind and side (and point) only, whose answers depend on the image alone, so the vision path
    is used from the start. Tasks not in ``tasks`` draw nothing from ``rng``."""
    if warmup:
        sc = shape_scene(rng, 1, radius=SINGLE_RADIUS)
        s = sc.shapes[0]
        turns = [colour_turn(s), shape_turn(s)]
        if s.cx < 0.4 * sc.width or s.cx > 0.6 * sc.width:
            turns.append(side_turn(s, "left" if s.cx < 0.4 * sc.width else "right"))
        if "point" in tasks:
            turns.append(point_turn(s))
        return [sc], [turns[i] for i in rng.permutation(len(turns))]
    if rng.random() < 0.2 and "compare" in tasks:
        q = make_question(rng, "compare")
        return q.scenes, [(q.text, q.answer)]
    n = 1 if rng.random() < (SINGLE_SHARE_POINT if "point" in tasks else SINGLE_SHARE) else int(rng.integers(2, 4))
    sc = shape_scene(rng, n, radius=SINGLE_RADIUS if n == 1 else RADIUS_RANGE)
    pool: list[tuple[str, str]] = [("How many shapes are there?", str(n))] if "count" in tasks else []
    for s in sc.shapes[:1] if n == 1 else []:
        if "colour" in tasks:
            pool.append(colour_turn(s))
        if "shape" in tasks:
            pool.append(shape_turn(s))
        if "point" in tasks:
            pool.append(point_turn(s))
        if "side" in tasks and (s.cx < 0.4 * sc.width or s.cx > 0.6 * sc.width):
            pool.append(side_turn(s, "left" if s.cx < 0.4 * sc.width else "right"))
    if "point" in tasks and n > 1:  # which of several shapes is named: point at it, or name its colour or kind
        for s in sc.shapes:
            pool += [point_turn(s), colour_turn(s), shape_turn(s)]
    k = min(len(pool), int(rng.integers(2, 5)))
    turns = [pool[i] for i in rng.permutation(len(pool))[:k]]
    return [sc], turns
