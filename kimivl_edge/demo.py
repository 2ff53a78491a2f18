"""`kimivl-edge demo`: the main job end to end on the bundled tiny model, in one command.

Converts the two tiny checkpoints (Q4_K_M text + Q8_0 mmproj) into a build folder, then answers questions about
generated images through the runtime (numpy vision + llama.cpp decoder). Instruct: single-image questions, a
two-image comparison, an OS-agent grounding question whose PyAutoGUI click is parsed by the runtime and drawn on
the original screenshot, and a question across the frames of a GIF (the video path). Thinking: its reasoning
printed apart from its answer. It prints image tokens, encode time, prefill and decode speed.

The bundled checkpoints (kimivl_edge/assets/kimi-vl-tiny and kimi-vl-tiny-thinking) were trained on small synthetic
visual tasks (training/tasks.py, README). Without an asset, a synthetic checkpoint with random weights is used and
the answers are noise.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def build_dir() -> Path:
    return Path(os.environ.get("KIMIVL_EDGE_BUILD", "build/demo"))


ASSETS = {"instruct": "kimi-vl-tiny", "thinking": "kimi-vl-tiny-thinking"}


def bundled_checkpoint(root: Path, variant: str = "instruct") -> tuple[Path, bool]:
    """The trained tiny checkpoint of ``variant`` shipped as a package asset if present, else a synthetic one
    (random weights)."""
    asset = Path(__file__).parent / "assets" / ASSETS[variant]
    if (asset / "config.json").is_file():
        return asset, True
    from .synth import synth

    ckpt = root / f"Kimi-VL-A3B-{variant.title()}-tiny-random"
    if not (ckpt / "model.safetensors.index.json").is_file():
        synth(ckpt, "tiny", variant, seed=0, force=True)
    return ckpt, False


# The trained model's task (training/tasks.py): small non-square images on a light background; one larger shape
# (radius 18-26 px) for colour, kind and side questions, 1-3 shapes of distinct kinds and colours (radius 14-22 px)
# for counting and comparison. Squares and triangles are inscribed in the circle of that radius, as in training.
_RGB = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 0)}


def _polygon(kind: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        a = r / math.sqrt(2)
        return [(x - a, y - a), (x + a, y - a), (x + a, y + a), (x - a, y + a)]
    return [(x + r * math.cos(t), y - r * math.sin(t)) for t in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]


def _scene(size: tuple[int, int], shapes):
    """A light background with (kind, centre x, centre y, radius, colour) shapes, drawn as in training."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (240, 238, 232))
    d = ImageDraw.Draw(img)
    for kind, x, y, r, colour in shapes:
        if kind == "circle":
            d.ellipse((x - r, y - r, x + r, y + r), fill=_RGB[colour])
        else:
            d.polygon(_polygon(kind, x, y, r), fill=_RGB[colour])
    return img


def demo_images(root: Path) -> dict[str, Path]:
    specs = {  # name: (size, [(kind, centre x, centre y, radius, colour)])
        "three.png": ((150, 110), [("circle", 35, 40, 18, "red"), ("square", 110, 35, 20, "blue"),
                                   ("triangle", 75, 82, 18, "green")]),
        "one.png": ((120, 100), [("square", 60, 50, 20, "green")]),
        "two.png": ((130, 100), [("circle", 35, 50, 18, "blue"), ("triangle", 95, 50, 18, "red")]),
        "triangle.png": ((140, 96), [("triangle", 105, 50, 24, "yellow")]),
    }
    out = {}
    for name, (size, shapes) in specs.items():
        _scene(size, shapes).save(root / name)
        out[name] = root / name
    return out


def demo_media(root: Path) -> dict[str, Path]:
    """A screenshot-sized scene for grounding (over the tiny models' patch budget: resized, then padded) and a
    6-frame GIF of a red circle moving right (2 frames per second)."""
    from PIL import Image

    screen = _scene((240, 200), [("circle", 60, 140, 24, "red"), ("square", 180, 60, 26, "blue"),
                                ("triangle", 150, 150, 24, "green")])
    screen.save(root / "screen.png")
    frames = [_scene((112, 56), [("circle", x, 28, 14, "red")]).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
              for x in (20, 34, 48, 62, 76, 90)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=500, loop=0)
    return {n: root / n for n in ("screen.png", "clip.gif")}


def _figures(st) -> str:
    media = ""
    if st.media.frames or st.media.pages:
        media = f"{st.media.frames} frames, " if st.media.frames else f"{st.media.pages} pages, "
    return (f"   {media}{st.image_tokens} image tokens, encode {st.encode_seconds:.2f} s, prefill "
            f"{st.evaluated_tokens} tok at {st.prefill_tps:.0f} tok/s, decode {st.generated_tokens} tok at "
            f"{st.decode_tps:.0f} tok/s")


def _ask(model, title: str, parts: list[dict], question: str, expected: str, max_tokens: int):
    from .model import Generation

    msg = [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]
    g: Generation = model.generate(msg, max_tokens=max_tokens, temperature=0)
    names = ", ".join(Path(str(next(v for k, v in p.items() if k != "type"))).name for p in parts)
    print(f"\n[{title}] {names}\nQ: {question}")
    if g.reasoning is not None:
        print(f"thinking: {g.reasoning!r}")
    print(f"A: {g.answer!r}   (expected: {expected})")
    print(_figures(g.stats))
    return g


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser
    from .convert import convert_checkpoint
    from .grounding import draw, ground_prompt
    from .model import KimiVL

    ap = OneLineParser(prog="kimivl-edge demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args(argv)
    root = build_dir()
    root.mkdir(parents=True, exist_ok=True)
    imgs = {**demo_images(root), **demo_media(root)}

    def image(*names: str) -> list[dict]:
        return [{"type": "image", "image": str(imgs[n])} for n in names]

    instruct = [
        ("single image", image("three.png"), "How many shapes are there?", "3"),
        ("single image", image("triangle.png"), "What colour is the triangle?", "yellow"),
        ("single image", image("triangle.png"), "Is the yellow triangle on the left or the right?", "right"),
        ("two images", image("one.png", "two.png"), "Which image has more shapes?", "second"),
        ("grounding", image("screen.png"), ground_prompt("the blue square"),
         "pyautogui.click(x=0.750, y=0.300)"),
        ("video, 6 frames", [{"type": "video", "video": str(imgs["clip.gif"])}], "Which way did the shape move?",
         "right"),
    ]
    thinking = [
        ("thinking, single image", image("triangle.png"), "Is the yellow triangle on the left or the right?", "right"),
        ("thinking, two images", image("one.png", "two.png"), "Which image has more shapes?", "second"),
    ]
    for variant, questions in (("instruct", instruct), ("thinking", thinking)):
        ckpt, trained = bundled_checkpoint(root, variant)
        print(f"\ncheckpoint: {ckpt}" + ("" if trained else "  (synthetic, random weights: answers are noise)"))
        res = convert_checkpoint(ckpt, "q4_k_m", "q8_0", root / variant)
        for p in res:
            print(f"converted:  {p}  ({p.stat().st_size / 1e6:.1f} MB)")
        with KimiVL.load(res.text_path, res.mmproj_path, n_ctx=2048) as model:
            for title, parts, q, expected in questions:
                g = _ask(model, title, parts, q, expected, args.max_tokens)
                if title == "grounding":
                    out = root / "screen-answer.png"
                    draw(imgs["screen.png"], g.grounding, out)
                    for a in g.grounding:
                        print(f"   {a.kind} at {', '.join(f'({x:.0f}, {y:.0f})' for x, y in a.points)} pixels of "
                              f"the 240x200 original: drawn on {out}")
                    if not g.grounding:
                        print("   (no action in the answer)")
    print("\nWith a real checkpoint (downloaded to the HF cache or a directory; q4_k_edge is 9.55 GB against Q4_K_M's "
          "10.5 GB, see the README):\n"
          "  .venv/bin/kimivl-edge convert moonshotai/Kimi-VL-A3B-Instruct --outtype q4_k_edge --mmproj-type q8_0 "
          "--outdir models\n"
          "  .venv/bin/kimivl-edge chat -m models/Kimi-VL-A3B-Instruct-Q4_K_EDGE.gguf "
          "--mmproj models/mmproj-Kimi-VL-A3B-Instruct-Q8_0.gguf")
    return 0
