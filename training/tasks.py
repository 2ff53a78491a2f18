"""The synthetic visual tasks of the trained tiny Kimi-VL models: Pillow scenes, chat questions, answers, checkers.

A scene is 0-3 coloured shapes (distinct kinds and colours, so "the circle" and "the red one" are unambiguous) on a
plain light background, or a rendered two-digit number. Colour, shape and side questions are asked about a single,
larger shape (SINGLE_RADIUS); counting and comparison scenes hold 1-3 shapes (RADIUS_RANGE). Image sizes are
random in SIZE_RANGE (non-square, most not multiples of 28), so the preprocessing pads them and the 16x16 pos-emb
table is resampled to 6..12-patch grids. Grounding scenes are larger (GROUND_SIZE): most exceed the trained
assets' patch budget (TRAINED_IN_TOKEN_LIMIT), so the processor shrinks them and then pads them, and a wrong
mapping from normalized to original coordinates turns into wrong answers.

Tasks (every answer is short and ends, in the chat template, with <|im_end|>):
    colour  "What colour is the circle?"                       -> red | green | blue | yellow | purple | orange
    shape   "What shape is the red one?"                       -> circle | square | triangle | star
    count   "How many shapes are there?"                       -> 1 | 2 | 3
    side    "Is the red circle on the left or the right?"      -> left | right
    compare (two images) "Which image has more shapes?"        -> first | second
    ground  GROUND_PROMPT + "the red circle"                   -> pyautogui.click(x=0.412, y=0.730)
    box     "Give the bounding box of the red circle."         -> {"bbox_2d": [0.312, 0.204, 0.512, 0.404]}
    move    (video frames) "Which way did the shape move?"     -> left | right
    appear  (video frames) "In which frame did the shape appear?"         -> 2 .. frames
    red     (video frames) "How many frames show a red shape?"            -> 0 .. 4
    page    (document pages) "Which page shows the blue triangle?"        -> 1 .. pages
    pages2  (document pages) "How many pages have two shapes?"            -> 0 .. pages
    read    "What number is written in the image?"             -> 10..99
Grounding coordinates are normalized to 0-1 of the original image (Kimi-VL's convention, three decimals): x = cx / w.
"read" (EXTRA_TASKS) is generated and checked but not in the shipped models' training mix. Ground and box questions
name one of 1-3 shapes. Video questions show 4-12 frames of one scene (FRAME_SIZE); document questions 2-5 pages
(PAGE_SIZE); the tests send them through the runtime's video (GIF) and PDF paths.

Every question also has a short *thought*, the reasoning the Thinking model writes before its answer
(``◁think▷thought◁/think▷answer``): it lists what it sees (the shapes, each frame's or page's content) before it
counts, compares or points.

Everything is a pure function of a numpy Generator, so a seed fixes the data exactly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kimivl_edge.grounding import GROUND_PROMPT
from kimivl_edge.prompt import THINK_CLOSE, THINK_OPEN, user_message

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
    "yellow": (235, 200, 0), "purple": (140, 40, 180), "orange": (245, 130, 0),
}
KINDS = ("circle", "square", "triangle", "star")
SINGLE_TASKS = ("colour", "shape", "count", "side", "compare", "ground", "box")
MULTI_TASKS = ("move", "appear", "red", "page", "pages2")  # questions across video frames / document pages
TASKS = SINGLE_TASKS + MULTI_TASKS  # trained and evaluated (the shipped assets)
EXTRA_TASKS = ("read",)  # generated and checked, not in the shipped assets' training mix
VIDEO_TASKS = ("move", "appear", "red")
SIZE_RANGE = (84, 154)  # inclusive range of image widths and heights, in pixels (6..12-patch grids)
GROUND_SIZE = (150, 250)  # grounding scenes: most are over TRAINED_IN_TOKEN_LIMIT patches, so they are shrunk
GROUND_RADIUS = (18, 28)
TRAINED_IN_TOKEN_LIMIT = 196  # the trained assets' preprocessor_config.json in_token_limit (14x14 patches)
RADIUS_RANGE = (14, 22)  # shape circumradius; >= 14 keeps a 5-pixel-rounded centre inside every kind
SINGLE_RADIUS = (18, 26)  # one-shape scenes (colour, shape, side): larger, so the kind spans 2-4 patches a side
FRAME_SIZE = (112, 56)  # video frames (w, h): 8x4 patches, 4x2 image tokens
FRAME_RADIUS = (12, 16)
FRAMES = (4, 12)  # frames per video question (inclusive)
PAGE_SIZE = (84, 112)  # document pages (w, h): 6x8 patches
PAGE_RADIUS = (12, 16)
PAGES = (2, 5)  # pages per document question (inclusive)
MAX_RED = 4
SINGLE_SHARE = 0.5  # share of one-shape chats among the single-image chats that are not compare
MULTI_SHARE = 0.3  # share of video / document chats
COMPARE_SHARE = 0.15
DECIMALS = 3  # normalized coordinates in answers
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(KINDS), "count": 1 / 3, "side": 1 / 2, "compare": 1 / 2,
          "move": 1 / 2, "read": 1 / 90}  # the others are computed per question (see chance)


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
    target: Shape | None = None  # the shape a "ground" or "box" question asks about
    thought: str = ""  # the Thinking model's reasoning before the answer
    media: str = "images"  # "images", "video" (the scenes are its frames) or "pages" (of a document)

    def messages(self, blank: bool = False) -> list[dict]:
        """A one-turn chat: the images first, then the question text (Kimi-VL's message format)."""
        return [user_message(self.text, [s.render(blank) for s in self.scenes])]

    @property
    def target_text(self) -> str:
        """What the Thinking model writes: ◁think▷thought◁/think▷answer."""
        return f"{THINK_OPEN}{self.thought}{THINK_CLOSE}{self.answer}"


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


def _size(rng: np.random.Generator, size: tuple[int, int] = SIZE_RANGE) -> tuple[int, int]:
    lo, hi = size
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(225, 256, size=3))


def shape_scene(rng: np.random.Generator, n: int, side_of_first: str | None = None,
                radius: tuple[int, int] = RADIUS_RANGE, size: tuple[int, int] = SIZE_RANGE,
                dims: tuple[int, int] | None = None) -> Scene:
    """A scene with ``n`` non-overlapping shapes of distinct kinds and colours; if ``side_of_first`` is given, the
    first shape's centre lies in the outer 40 % of that side (so "left or right" has a clear answer)."""
    while True:
        w, h = dims or _size(rng, size)
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


def motion_frames(rng: np.random.Generator, n: int) -> tuple[list[Scene], str]:
    """``n`` frames of one shape crossing the frame from one outer third to the other; returns the direction."""
    w, h = FRAME_SIZE
    r = int(rng.integers(FRAME_RADIUS[0], FRAME_RADIUS[1] + 1))
    kind, colour = KINDS[int(rng.integers(len(KINDS)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
    a = int(rng.integers(r + 2, int(0.35 * w) + 1))
    b = int(rng.integers(int(0.65 * w), w - r - 2))
    direction = ("left", "right")[int(rng.integers(2))]
    start, end = (a, b) if direction == "right" else (b, a)
    cy = int(rng.integers(r + 2, h - r - 2))
    bg = _background(rng)
    xs = np.rint(np.linspace(start, end, n)).astype(int)
    return [Scene(w, h, bg, [Shape(kind, colour, int(x), cy, r)]) for x in xs], direction


def _one_shape_frame(rng: np.random.Generator, bg: tuple[int, int, int], colours: list[str]) -> Scene:
    w, h = FRAME_SIZE
    r = int(rng.integers(FRAME_RADIUS[0], FRAME_RADIUS[1] + 1))
    s = Shape(KINDS[int(rng.integers(len(KINDS)))], colours[int(rng.integers(len(colours)))],
              int(rng.integers(r + 2, w - r - 2)), int(rng.integers(r + 2, h - r - 2)), r)
    return Scene(w, h, bg, [s])


def describe(shapes: list[Shape]) -> str:
    """"a red circle and a blue square" (the Thinking model's listing of what it sees)."""
    names = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind}" for s in shapes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _frames_span(a: int, b: int) -> str:
    return f"Frame {a}" if a == b else f"Frames {a}-{b}"


def place_words(s: Shape, w: int, h: int) -> str:
    """Where a shape is, in thirds of the image: "top left", "middle centre", ..."""
    rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
    return f"{rows[min(2, int(3 * s.cy / h))]} {cols[min(2, int(3 * s.cx / w))]}"


# ---------------------------------------------------------------------------------------------------------------
# Questions


def click_text(s: Shape, sc: Scene) -> str:
    """A grounding answer in Kimi-VL's convention: the shape's centre normalized to 0-1 of the original image."""
    return f"pyautogui.click(x={s.cx / sc.width:.{DECIMALS}f}, y={s.cy / sc.height:.{DECIMALS}f})"


def shape_box(s: Shape, sc: Scene) -> tuple[int, int, int, int]:
    """The tight pixel box (x0, y0, x1, y1), x1 and y1 exclusive, of the shape's rendered pixels."""
    ys, xs = np.nonzero(shape_mask(s, sc.width, sc.height))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_text(s: Shape, sc: Scene) -> str:
    x0, y0, x1, y1 = shape_box(s, sc)
    v = (x0 / sc.width, y0 / sc.height, x1 / sc.width, y1 / sc.height)
    return '{"bbox_2d": [' + ", ".join(f"{c:.{DECIMALS}f}" for c in v) + "]}"


def ground_turn(s: Shape, sc: Scene) -> tuple[str, str, str]:
    """The (question, answer, thought) of a grounding question: the model card's OS-agent prompt naming the shape."""
    return (f"{GROUND_PROMPT}the {s.colour} {s.kind}", click_text(s, sc),
            f"The {s.colour} {s.kind} is at the {place_words(s, sc.width, sc.height)}.")


def box_turn(s: Shape, sc: Scene) -> tuple[str, str, str]:
    return (f"Give the bounding box of the {s.colour} {s.kind}.", box_text(s, sc),
            f"The {s.colour} {s.kind} is at the {place_words(s, sc.width, sc.height)}.")


def colour_turn(s: Shape) -> tuple[str, str, str]:
    return f"What colour is the {s.kind}?", s.colour, f"I see {describe([s])}."


def shape_turn(s: Shape) -> tuple[str, str, str]:
    return f"What shape is the {s.colour} one?", s.kind, f"I see {describe([s])}."


def side_turn(s: Shape, side: str) -> tuple[str, str, str]:
    return (f"Is the {s.colour} {s.kind} on the left or the right?", side,
            f"The {s.colour} {s.kind} is on the {side}.")


def count_turn(sc: Scene) -> tuple[str, str, str]:
    return "How many shapes are there?", str(len(sc.shapes)), f"I see {describe(sc.shapes)}."


def _q(task: str, scenes: list[Scene], turn: tuple[str, str, str], target: Shape | None = None,
       media: str = "images") -> Question:
    return Question(task, scenes, turn[0], turn[1], target, turn[2], media)


def make_question(rng: np.random.Generator, task: str) -> Question:
    """One question of ``task`` with balanced answers."""
    if task == "count":
        sc = shape_scene(rng, int(rng.integers(1, 4)))
        return _q(task, [sc], count_turn(sc))
    if task == "compare":
        a, b = (int(v) + 1 for v in rng.permutation(3)[:2])
        s1, s2 = shape_scene(rng, a), shape_scene(rng, b)
        return _q(task, [s1, s2], ("Which image has more shapes?", "first" if a > b else "second",
                                   f"First image: {a}. Second image: {b}."))
    if task == "read":
        sc = number_scene(rng)
        return Question(task, [sc], "What number is written in the image?", str(sc.number))
    if task == "side":
        side = ("left", "right")[int(rng.integers(2))]
        sc = shape_scene(rng, 1, side_of_first=side, radius=SINGLE_RADIUS)
        return _q(task, [sc], side_turn(sc.shapes[0], side))
    if task in ("ground", "box"):
        n = int(rng.integers(1, 4))
        sc = shape_scene(rng, n, radius=GROUND_RADIUS, size=GROUND_SIZE)
        s = sc.shapes[int(rng.integers(n))]
        return _q(task, [sc], ground_turn(s, sc) if task == "ground" else box_turn(s, sc), target=s)
    if task in VIDEO_TASKS:
        return video_question(rng, task)
    if task in ("page", "pages2"):
        return document_question(rng, task)
    sc = shape_scene(rng, 1, radius=SINGLE_RADIUS)
    s = sc.shapes[0]
    if task == "colour":
        return _q(task, [sc], colour_turn(s))
    if task == "shape":
        return _q(task, [sc], shape_turn(s))
    raise ValueError(f"unknown task {task!r}")


def video_question(rng: np.random.Generator, task: str) -> Question:
    """A question across the frames of one short clip (move: 4-12 frames; appear, red: 4-8)."""
    if task == "move":
        frames, direction = motion_frames(rng, int(rng.integers(FRAMES[0], FRAMES[1] + 1)))
        n = len(frames)
        start = "left" if direction == "right" else "right"
        return _q(task, frames, ("Which way did the shape move?", direction,
                                 f"Frame 1: {start}. Frame {n}: {direction}."), media="video")
    n = int(rng.integers(FRAMES[0], 9))
    bg = _background(rng)
    if task == "appear":
        k = int(rng.integers(2, n + 1))
        moving, _ = motion_frames(rng, n)
        frames = [Scene(f.width, f.height, bg) for f in moving[:k - 1]] + [
            Scene(f.width, f.height, bg, f.shapes) for f in moving[k - 1:]]
        return _q(task, frames, ("In which frame did the shape appear?", str(k),
                                 f"{_frames_span(1, k - 1)}: empty. Frame {k}: {describe(frames[-1].shapes)}."),
                  media="video")
    if task == "red":
        m = int(rng.integers(0, min(n, MAX_RED) + 1))
        red = set(int(i) for i in rng.permutation(n)[:m])
        others = [c for c in COLOURS if c != "red"]
        frames = [_one_shape_frame(rng, bg, ["red"] if i in red else others) for i in range(n)]
        which = ", ".join(str(i + 1) for i in sorted(red))
        return _q(task, frames, ("How many frames show a red shape?", str(m),
                                 f"Red in frames {which}." if m else "No red shape."), media="video")
    raise ValueError(f"unknown task {task!r}")


def document_question(rng: np.random.Generator, task: str) -> Question:
    """A question across 2-5 document pages of 1-2 shapes each (every kind-and-colour pair occurs once)."""
    n = int(rng.integers(PAGES[0], PAGES[1] + 1))
    while True:
        pages = [shape_scene(rng, int(rng.integers(1, 3)), radius=PAGE_RADIUS, dims=PAGE_SIZE) for _ in range(n)]
        pairs = [(s.kind, s.colour) for p in pages for s in p.shapes]
        if len(set(pairs)) == len(pairs):
            break
    listing = " ".join(f"Page {i + 1}: {describe(p.shapes)}." for i, p in enumerate(pages))
    if task == "page":
        k = int(rng.integers(n))
        s = pages[k].shapes[int(rng.integers(len(pages[k].shapes)))]
        return _q(task, pages, (f"Which page shows the {s.colour} {s.kind}?", str(k + 1), listing), target=s,
                  media="pages")
    if task == "pages2":
        return _q(task, pages, ("How many pages have two shapes?", str(sum(len(p.shapes) == 2 for p in pages)),
                                listing), media="pages")
    raise ValueError(f"unknown task {task!r}")


def question_set(seed: int, n: int, tasks: tuple[str, ...] = TASKS) -> list[Question]:
    """``n`` questions cycling through ``tasks`` in order, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_question(rng, tasks[i % len(tasks)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Checking

_CLICK_RE = re.compile(r"^\s*pyautogui\.click\(x=(\d\.\d+), y=(\d\.\d+)\)\s*$")
_BOX_RE = re.compile(r'^\s*\{"bbox_2d": \[(\d\.\d+), (\d\.\d+), (\d\.\d+), (\d\.\d+)\]\}\s*$')


def parse_click(text: str) -> tuple[float, float] | None:
    """The normalized (x, y) of a ``pyautogui.click(x=0.412, y=0.730)`` answer (this module's own reading,
    independent of the runtime's parser)."""
    m = _CLICK_RE.match(text)
    return (float(m.group(1)), float(m.group(2))) if m else None


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    m = _BOX_RE.match(text)
    return (float(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))) if m else None


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hit(q: Question, x: float, y: float) -> bool:
    """Whether the pixel (x, y) of the original image lies inside the question's named shape."""
    sc, s = q.scenes[0], q.target
    if s is None:
        return False
    xi, yi = int(x), int(y)
    return 0 <= xi < sc.width and 0 <= yi < sc.height and bool(shape_mask(s, sc.width, sc.height)[yi, xi])


def answer_point(q: Question, answer: str) -> tuple[float, float] | None:
    """The answer's point (a click, or a box's centre) in pixels of the original image."""
    sc = q.scenes[0]
    p = parse_click(answer) if q.task == "ground" else None
    b = parse_box(answer) if q.task == "box" else None
    if p is not None:
        return p[0] * sc.width, p[1] * sc.height
    if b is not None:
        return (b[0] + b[2]) / 2 * sc.width, (b[1] + b[3]) / 2 * sc.height
    return None


def ground_distance(q: Question, answer: str) -> float | None:
    """Pixels (of the original image) from the answer's point, or box centre, to the named shape's centre."""
    p = answer_point(q, answer)
    if p is None or q.target is None:
        return None
    return math.hypot(p[0] - q.target.cx, p[1] - q.target.cy)


def is_correct(q: Question, answer: str) -> bool:
    """Exact match (whitespace and case ignored); a ground answer is right if its point, mapped to the original
    image, lies inside the named shape; a box answer if its IoU with the shape's box is at least 0.5."""
    if q.task == "ground":
        p = answer_point(q, answer)
        return p is not None and hit(q, *p)
    if q.task == "box":
        b = parse_box(answer)
        if b is None or q.target is None:
            return False
        sc = q.scenes[0]
        pixels = (b[0] * sc.width, b[1] * sc.height, b[2] * sc.width, b[3] * sc.height)
        return iou(pixels, shape_box(q.target, sc)) >= 0.5
    return answer.strip().lower() == q.answer.lower()


def _box_chance(q: Question) -> float:
    """The share of placements of a box of the right size, anywhere in the image, with IoU >= 0.5."""
    sc = q.scenes[0]
    assert q.target is not None
    x0, y0, x1, y1 = shape_box(q.target, sc)
    bw, bh = x1 - x0, y1 - y0
    dx = np.arange(sc.width - bw + 1)[None, :] - x0
    dy = np.arange(sc.height - bh + 1)[:, None] - y0
    inter = np.clip(bw - np.abs(dx), 0, None) * np.clip(bh - np.abs(dy), 0, None)
    return float((inter / (2 * bw * bh - inter) >= 0.5).mean())


def chance(q: Question) -> float:
    """Expected accuracy of a guess that ignores the images: 1/(number of answers), the shape's area for ground
    answers, the share of right placements of a right-sized box for box answers."""
    n = len(q.scenes)
    if q.task == "ground":
        sc = q.scenes[0]
        assert q.target is not None
        return float(shape_mask(q.target, sc.width, sc.height).mean())
    if q.task == "box":
        return _box_chance(q)
    if q.task == "appear":
        return 1 / (n - 1)
    if q.task == "red":
        return 1 / (min(n, MAX_RED) + 1)
    if q.task == "page":
        return 1 / n
    if q.task == "pages2":
        return 1 / (n + 1)
    return CHANCE[q.task]


# ---------------------------------------------------------------------------------------------------------------
# Training chats

Turn = tuple[str, str, str]  # (question, answer, thought)


def make_conversation(rng: np.random.Generator, warmup: bool = False, tasks: tuple[str, ...] = TASKS,
                      count_last: bool = False) -> tuple[list[Scene], list[Turn]]:
    """A training chat: scenes and (question, answer, thought) turns about them. COMPARE_SHARE of the chats
    compare two images, MULTI_SHARE ask about video frames or document pages (one turn); the others show one image
    of 1-3 shapes and ask 2-4 questions of it (count; for a lone shape its colour, kind, side; ground and box
    questions on any named shape, and its colour and kind when there are several), half of them on a large
    grounding scene (GROUND_SIZE), so one vision pass supervises several answers. The first turn has exactly the
    form of a held-out question. ``warmup``: one shape, its colour, kind and side (and where it is), whose answers
    depend on the image alone. ``count_last``: a chat that asks the count asks it last (for the Thinking model,
    which is supervised on the last turn only; shuffled, its count was the last turn of 5 % of the chats and its
    thought never formed). The random draws are the same either way."""
    ground = [t for t in ("ground", "box") if t in tasks]
    if warmup:
        sc = shape_scene(rng, 1, radius=SINGLE_RADIUS)
        s = sc.shapes[0]
        turns = [colour_turn(s), shape_turn(s)]
        if s.cx < 0.4 * sc.width or s.cx > 0.6 * sc.width:
            turns.append(side_turn(s, "left" if s.cx < 0.4 * sc.width else "right"))
        if "ground" in tasks:
            turns.append(ground_turn(s, sc))
        return [sc], [turns[i] for i in rng.permutation(len(turns))]
    r = rng.random()
    multi = [t for t in MULTI_TASKS if t in tasks]
    if r < COMPARE_SHARE and "compare" in tasks:
        q = make_question(rng, "compare")
        return q.scenes, [(q.text, q.answer, q.thought)]
    if r < COMPARE_SHARE + MULTI_SHARE and multi:
        q = make_question(rng, multi[int(rng.integers(len(multi)))])
        return q.scenes, [(q.text, q.answer, q.thought)]
    n = 1 if rng.random() < SINGLE_SHARE else int(rng.integers(2, 4))
    large = bool(ground) and rng.random() < 0.5
    sc = shape_scene(rng, n, radius=GROUND_RADIUS if large else SINGLE_RADIUS if n == 1 else RADIUS_RANGE,
                     size=GROUND_SIZE if large else SIZE_RANGE)
    pool: list[Turn] = [count_turn(sc)] if "count" in tasks else []
    for s in sc.shapes:
        if "ground" in tasks:
            pool.append(ground_turn(s, sc))
        if "box" in tasks:
            pool.append(box_turn(s, sc))
        if n == 1 or ground:  # which of several shapes is named: name its colour or kind
            if "colour" in tasks:
                pool.append(colour_turn(s))
            if "shape" in tasks:
                pool.append(shape_turn(s))
        if n == 1 and "side" in tasks and (s.cx < 0.4 * sc.width or s.cx > 0.6 * sc.width):
            pool.append(side_turn(s, "left" if s.cx < 0.4 * sc.width else "right"))
    k = min(len(pool), int(rng.integers(2, 5)))
    turns = [pool[i] for i in rng.permutation(len(pool))[:k]]
    if count_last and "count" in tasks and pool[0] in turns[:-1]:
        turns.remove(pool[0])
        turns.append(pool[0])
    return [sc], turns
