"""Grounding: Kimi-VL's PyAutoGUI actions, points and boxes parsed, mapped to pixels of the original image, drawn.

The mapping oracle is the processor's own output: a shape is drawn at known pixels of an image that needs resizing
and padding; its position is then measured in the pixels the model actually receives (docs/model.md §4:
``image.preprocess``), normalized by the image content the model sees there (the non-padding region), and must map
back onto the drawn pixels.

End to end, the tiny model's answer is forced by a GBNF grammar (the API's ``grammar`` sampling setting, ``run
--grammar-file``) to a known PyAutoGUI click, so the grounding that comes out is known whatever the weights say.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kimivl_edge.grounding import GROUND_PROMPT, Action, draw, ground_prompt, parse_actions, parse_normalized
from kimivl_edge.image import ImageProcessorConfig, preprocess
from shared import run_cli

CFG = ImageProcessorConfig(patch_size=14, merge_kernel_size=(2, 2), in_token_limit=4096,
                           image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), pad_input=True)


# ---------------------------------------------------------------------------------------------------------------
# Parser


def test_every_pyautogui_action_form():
    answer = ("pyautogui.click(x=0.972, y=0.186)\n"
              "pyautogui.doubleClick(0.5, 0.25)\n"
              "pyautogui.rightClick(x=0.1, y=0.9, button='right')\n"
              "pyautogui.moveTo((0.2, 0.4), duration=0.5)\n"
              "pyautogui.dragTo(x=0.75, y=0.5, duration=1)\n"
              "pyautogui.scroll(-5, x=0.5, y=0.5)\n"
              "pyautogui.scroll(clicks=3)\n"
              "pyautogui.write(message='hello (world)')\n"
              "pyautogui.typewrite('abc')\n")
    acts = parse_actions(answer, [(1000, 500)])
    assert [a.kind for a in acts] == ["click", "doubleClick", "rightClick", "moveTo", "dragTo", "scroll", "scroll",
                                      "write", "write"]
    assert acts[0].points[0] == pytest.approx((972.0, 93.0))
    assert acts[0].normalized == (0.972, 0.186)
    assert acts[1].points[0] == pytest.approx((500.0, 125.0))
    assert acts[2].points[0] == pytest.approx((100.0, 450.0))
    assert acts[3].points[0] == pytest.approx((200.0, 200.0))
    assert acts[4].points[0] == pytest.approx((750.0, 250.0))
    assert acts[5].points[0] == pytest.approx((500.0, 250.0)) and acts[5].amount == -5
    assert acts[6].points == () and acts[6].amount == 3
    assert acts[7].text == "hello (world)" and acts[8].text == "abc"
    assert all(a.image_index == 0 and a.boxes == () for a in acts)


def test_drag_as_move_then_drag_gives_both_points_in_order():
    acts = parse_actions("pyautogui.moveTo(x=0.1, y=0.2); pyautogui.dragTo(x=0.3, y=0.4)", [(100, 100)])
    assert [(a.kind, a.points) for a in acts] == [("moveTo", ((10.0, 20.0),)), ("dragTo", ((30.0, 40.0),))]


def test_bare_points_and_boxes():
    answer = ('The button is at (x=0.25, y=0.5); the icon at (0.75, 0.125).\n'
              '```json\n[{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "label": "OK button"}, {"bbox_2d": [0, 0, 1, 1]}]\n```')
    acts = parse_actions(answer, [(800, 400)])
    assert [a.kind for a in acts] == ["point", "point", "box", "box"]
    assert acts[0].points[0] == pytest.approx((200.0, 200.0))
    assert acts[1].points[0] == pytest.approx((600.0, 50.0))
    assert acts[2].boxes[0] == pytest.approx((80.0, 80.0, 240.0, 160.0)) and acts[2].text == "OK button"
    assert acts[3].boxes[0] == pytest.approx((0.0, 0.0, 800.0, 400.0)) and acts[3].text is None


def test_thinking_answer_after_the_marker():
    text = "\u25c1think\u25b7The OK button is bottom right.\u25c1/think\u25b7pyautogui.click(x=0.9, y=0.8)"
    from kimivl_edge.prompt import split_thinking

    _, answer = split_thinking(text)
    assert [(a.kind, a.points) for a in parse_actions(answer, [(10, 10)])] == [("click", ((9.0, 8.0),))]


@pytest.mark.parametrize("bad", [
    "pyautogui.click(x=1.5, y=0.2)",              # not normalized
    "pyautogui.click(x=-0.1, y=0.2)",
    "pyautogui.click(x=0.5)",                     # missing y
    "pyautogui.click(x=0.5, y=",                  # unbalanced
    "pyautogui.click(x='a', y=0.1)",
    "pyautogui.click(x=True, y=0.5)",
    "pyautogui.click(x=__import__('os'), y=0)",   # not a literal: never evaluated
    "pyautogui.click(x=0.5 y=0.5)",               # syntax error
    "pyautogui.hotkey('ctrl', 'c')",              # not a grounding action
    "pyautogui.scroll(x=0.5, y=0.5)",             # scroll without clicks
    "pyautogui.write(42)",
    '{"bbox_2d": [0.1, 0.2, 0.3]}',               # three numbers
    '{"bbox_2d": [0.5, 0.2, 0.3, 0.4]}',          # x1 < x0
    '{"bbox_2d": [0.1, 0.2, 0.3, 1.4]}',
    '{"bbox_2d": ["a", 0.2, 0.3, 0.4]}',
    "(x=0.5, y=2)",
    "no coordinates here",
    "",
])
def test_malformed_output_is_left_out(bad):
    assert parse_actions(bad, [(100, 100)]) == []


def test_malformed_next_to_wellformed_keeps_the_good_one():
    acts = parse_actions("pyautogui.click(x=7, y=0.1) then pyautogui.click(x=0.5, y=0.5)", [(10, 20)])
    assert [a.points for a in acts] == [((5.0, 10.0),)]


def test_points_inside_a_call_are_not_counted_twice():
    assert [r.kind for r in parse_normalized("pyautogui.moveTo((0.2, 0.4))")] == ["moveTo"]


def test_the_last_image_is_the_screenshot():
    acts = parse_actions("pyautogui.click(x=0.5, y=0.5)", [(100, 100), (640, 480)])
    assert acts[0].image_index == 1 and acts[0].points[0] == pytest.approx((320.0, 240.0))
    assert parse_actions("pyautogui.click(x=0.5, y=0.5)", []) == []


def test_ground_prompt_is_the_model_cards():
    assert GROUND_PROMPT == "请观察屏幕截图，请通过操作和坐标点定位以下元素。<指令> "
    assert ground_prompt("  the OK button ") == GROUND_PROMPT + "the OK button"
    from kimivl_edge.errors import UsageError

    with pytest.raises(UsageError):
        ground_prompt("  ")


# ---------------------------------------------------------------------------------------------------------------
# Mapping, against what the model sees


def _model_view(img: Image.Image) -> np.ndarray:
    """The processor's input to the model, back as an [H, W, 3] image in 0..255 (padded, resized)."""
    patches, grid = preprocess(img, CFG)
    gh, gw = (int(v) for v in grid[0])
    x = patches.reshape(gh, gw, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(gh * 14, gw * 14, 3)
    return (x * 0.5 + 0.5) * 255


def _measure(view: np.ndarray) -> tuple[tuple[float, float], tuple[float, float, float, float], tuple[int, int]]:
    """In the model's pixels: the white shape's centre and box, and the content size (the grey, non-padding part)."""
    content = view.max(axis=2) > 40          # background grey 128, padding 0
    ys, xs = np.nonzero(content)
    cw, ch = xs.max() + 1, ys.max() + 1
    white = view.min(axis=2) > 200
    wy, wx = np.nonzero(white)
    centre = (wx.mean() + 0.5, wy.mean() + 0.5)
    box = (wx.min(), wy.min(), wx.max() + 1, wy.max() + 1)
    return centre, box, (cw, ch)


@pytest.mark.parametrize("size, centre, resized", [
    ((1500, 1100), (1400, 1000), True),    # over the 4096-patch budget: shrunk (s ~ 0.70), then padded
    ((300, 130), (280, 118), False),       # under it: only padded, to 308 x 140
    ((1920, 1080), (1880, 40), True),      # a screenshot: 1196 x 672, padded to 1204 x 672
])
def test_a_point_on_a_drawn_shape_maps_back_to_its_pixels(size, centre, resized):
    w, h = size
    cx, cy = centre
    r = 12
    img = Image.new("RGB", size, (128, 128, 128))
    ImageDraw.Draw(img).rectangle((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=(255, 255, 255))
    view = _model_view(img)
    assert (view.shape[1] < w) == resized and view.shape[1] % 28 == 0 and view.shape[0] % 28 == 0
    (mx, my), (bx0, by0, bx1, by1), (cw, ch) = _measure(view)
    # what a model trained on normalized coordinates writes, measured on its own input
    answer = (f"pyautogui.click(x={mx / cw:.4f}, y={my / ch:.4f}) "
              f'{{"bbox_2d": [{bx0 / cw:.4f}, {by0 / ch:.4f}, {bx1 / cw:.4f}, {by1 / ch:.4f}]}}')
    click, box = parse_actions(answer, [size])
    tol = 1.5 * w / cw + 0.5   # one model pixel, in original pixels, plus rounding
    assert click.points[0] == pytest.approx((cx, cy), abs=tol)
    assert box.boxes[0] == pytest.approx((cx - r, cy - r, cx + r, cy + r), abs=tol)
    # the padded frame would miss: the test tells the two frames apart
    padded_x = mx / view.shape[1] * w
    assert abs(padded_x - cx) > tol


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def test_draw_marks_points_and_boxes_in_original_pixels(tmp_path):
    src = tmp_path / "shot.png"
    Image.new("RGB", (200, 100), (255, 255, 255)).save(src)
    acts = [Action("click", points=((50.0, 40.0),)), Action("box", boxes=((120.0, 20.0, 180.0, 80.0),))]
    out = tmp_path / "drawn.png"
    img = draw(src, acts, out)
    saved = Image.open(out).convert("RGB")
    assert saved.size == (200, 100) and np.array_equal(np.asarray(saved), np.asarray(img))
    px = saved.load()
    assert px[50, 40] == (255, 0, 0)                   # the cross at the point
    assert px[120, 50] == (255, 0, 0) and px[150, 20] == (255, 0, 0)  # box edges
    assert px[150, 50] == (255, 255, 255)              # inside the box: untouched
    assert px[10, 90] == (255, 255, 255)


def test_draw_to_an_unwritable_path_is_a_usage_error(tmp_path):
    from kimivl_edge.errors import UsageError

    src = tmp_path / "shot.png"
    Image.new("RGB", (20, 10)).save(src)
    with pytest.raises(UsageError, match="cannot write"):
        draw(src, [], tmp_path / "no" / "such" / "dir.png")


# ---------------------------------------------------------------------------------------------------------------
# End to end: an answer forced by a grammar, through the API and `run --ground`

CLICK = "pyautogui.click(x=0.250, y=0.500)"
GRAMMAR = f'root ::= "{CLICK}"\n'    # GBNF: the answer can only be this click
GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def model_pair(converted):
    ckpt = Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets" / "kimi-vl-tiny"
    return converted(ckpt, "f32", "f32")


@pytest.fixture(scope="module")
def model(model_pair):
    from kimivl_edge import KimiVL

    m = KimiVL.load(*model_pair, n_ctx=8192, n_threads=1, kv_type="f32")
    yield m
    m.close()


@pytest.fixture(scope="module")
def screenshot(tmp_path_factory) -> Path:
    """1500x1100: 107x78 = 8346 patches, over the 4096-patch budget, so the processor shrinks it, then pads."""
    path = tmp_path_factory.mktemp("shots") / "shot.png"
    Image.new("RGB", (1500, 1100), GREY).save(path)
    return path


def test_api_grounding_of_a_forced_click_is_in_pixels_of_the_original_screenshot(model, screenshot, tmp_path):
    from kimivl_edge.prompt import user_message

    icon = tmp_path / "icon.png"
    Image.new("RGB", (60, 40), GREY).save(icon)
    msgs = [user_message(ground_prompt("the OK button"), [str(icon), str(screenshot)])]
    prompt = model.render_prompt(msgs)
    gh, gw = prompt.images[1].grid
    assert gw * 14 < 1500 and gh * 14 < 1100                  # the model sees it resized (and padded)
    out = model.generate(msgs, temperature=0, max_tokens=40, grammar=GRAMMAR)
    assert out.answer == CLICK
    # 0.25 x 1500 = 375, 0.5 x 1100 = 550, in the last image (the screenshot), not the 60x40 icon
    assert out.grounding == [Action("click", points=((375.0, 550.0),), image_index=1, normalized=(0.25, 0.5))]


def _red_centre(img: Image.Image) -> tuple[float, float, int]:
    a = np.asarray(img.convert("RGB")).astype(int)
    ys, xs = np.nonzero((a[..., 0] == 255) & (a[..., 1] == 0) & (a[..., 2] == 0))
    return xs.mean() + 0.5, ys.mean() + 0.5, len(xs)


def test_cli_ground_prints_the_forced_action_and_draws_it_in_place(model_pair, screenshot, tmp_path):
    text, mm = model_pair
    grammar = tmp_path / "click.gbnf"
    grammar.write_text(GRAMMAR)
    out = tmp_path / "drawn.png"
    r = run_cli("run", "-m", str(text), "--mmproj", str(mm), "--image", str(screenshot), "--ground", "the OK button",
                "--draw", str(out), "--grammar-file", str(grammar), "--temp", "0", "--max-tokens", "40",
                "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{CLICK}\naction: click (375, 550)\ndrawn: {out}\n"
    drawn = Image.open(out)
    assert drawn.size == (1500, 1100)
    cx, cy, n = _red_centre(drawn)                       # a symmetric cross in a circle, centred on the point
    assert n > 0 and (cx, cy) == pytest.approx((375.5, 550.5), abs=1.0)
    assert np.asarray(drawn.convert("RGB"))[550, 375].tolist() == [255, 0, 0]
    assert np.asarray(drawn.convert("RGB"))[100, 1000].tolist() == list(GREY)


def test_cli_ground_and_grammar_errors_are_one_line(model_pair, tmp_path):
    text, mm = model_pair
    r = run_cli("run", "-m", str(text), "--mmproj", str(mm), "--ground", "x", "--threads", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--ground needs exactly one --image" in r.stderr
    empty = tmp_path / "empty.gbnf"
    empty.write_text("  \n")
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= (")
    rootless = tmp_path / "rootless.gbnf"
    rootless.write_text('answer ::= "a"')
    for path, msg in ((tmp_path / "missing.gbnf", "missing.gbnf: cannot read the grammar"),
                      (empty, "empty.gbnf: the grammar file is empty"),
                      (bad, "bad.gbnf: not a valid grammar (parse: error parsing grammar: expecting ')'"),
                      (rootless, "rootless.gbnf: not a valid grammar (grammar does not contain a 'root' symbol)")):
        r = run_cli("run", "-m", str(text), "-p", "Hi", "--grammar-file", str(path), "--threads", "1")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr
