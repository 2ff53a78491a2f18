"""`kimivl-edge demo`: the main job end to end on the bundled tiny model, in one command.

Converts the tiny checkpoint (Q4_K_M text + Q8_0 mmproj) into a build folder, then answers questions about
generated images through the runtime (numpy vision + llama.cpp decoder): one single-image question, one multi-image
question, and one grounding question whose (x, y) answer is drawn as a marker on the image saved next to it.
It prints the answers, image tokens, encode time, prefill and decode speed.

The bundled checkpoint (kimivl_edge/assets/kimi-vl-tiny) was trained on a small synthetic visual task
(training/train.py): it names colours and shape kinds, counts, tells left from right, compares two images and
points at a named shape (96.7 % of 600 held-out questions, README). Without the asset, a synthetic checkpoint with
random weights is used and the answers are noise.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path


def build_dir() -> Path:
    return Path(os.environ.get("KIMIVL_EDGE_BUILD", "build/demo"))


def bundled_checkpoint(root: Path) -> tuple[Path, bool]:
    """The trained tiny checkpoint shipped as a package asset if present, else a synthetic one (random weights)."""
    asset = Path(__file__).parent / "assets" / "kimi-vl-tiny"
    if (asset / "config.json").is_file():
        return asset, True
    from .synth import synth

    ckpt = root / "Kimi-VL-A3B-Instruct-tiny-random"
    if not (ckpt / "model.safetensors.index.json").is_file():
        synth(ckpt, "tiny", "instruct", seed=0, force=True)
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


def demo_images(root: Path) -> dict[str, Path]:
    from PIL import Image, ImageDraw

    specs = {  # name: (size, [(kind, centre x, centre y, radius, colour)])
        "three.png": ((150, 110), [("circle", 35, 40, 18, "red"), ("square", 110, 35, 20, "blue"),
                                   ("triangle", 75, 82, 18, "green")]),
        "one.png": ((120, 100), [("square", 60, 50, 20, "green")]),
        "two.png": ((130, 100), [("circle", 35, 50, 18, "blue"), ("triangle", 95, 50, 18, "red")]),
        "triangle.png": ((140, 96), [("triangle", 105, 50, 24, "yellow")]),
    }
    out = {}
    for name, (size, shapes) in specs.items():
        img = Image.new("RGB", size, (240, 238, 232))
        d = ImageDraw.Draw(img)
        for kind, x, y, r, colour in shapes:
            if kind == "circle":
                d.ellipse((x - r, y - r, x + r, y + r), fill=_RGB[colour])
            else:
                d.polygon(_polygon(kind, x, y, r), fill=_RGB[colour])
        img.save(root / name)
        out[name] = root / name
    return out


def draw_point(image: Path, answer: str) -> Path | None:
    m = re.search(r"\(\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\)", answer)
    if not m:
        return None
    from PIL import Image, ImageDraw

    x, y = float(m.group(1)), float(m.group(2))
    img = Image.open(image).convert("RGB")
    d = ImageDraw.Draw(img)
    d.line((x - 8, y, x + 8, y), fill="black", width=3)
    d.line((x, y - 8, x, y + 8), fill="black", width=3)
    out = image.with_name(image.stem + "-answer.png")
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser
    from .convert import convert_checkpoint
    from .model import KimiVL
    from .prompt import user_message

    ap = OneLineParser(prog="kimivl-edge demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    root = build_dir()
    root.mkdir(parents=True, exist_ok=True)
    ckpt, trained = bundled_checkpoint(root)
    print(f"checkpoint: {ckpt}" + ("" if trained else "  (synthetic, random weights: answers are noise)"))
    res = convert_checkpoint(ckpt, "q4_k_m", "q8_0", root)
    for p in res:
        print(f"converted:  {p}  ({p.stat().st_size / 1e6:.1f} MB)")
    imgs = demo_images(root)
    questions = [
        ("single image", [imgs["three.png"]], "How many shapes are there?", "3"),
        ("single image", [imgs["triangle.png"]], "What colour is the triangle?", "yellow"),
        ("single image", [imgs["triangle.png"]], "What shape is the yellow one?", "triangle"),
        ("single image", [imgs["triangle.png"]], "Is the yellow triangle on the left or the right?", "right"),
        ("two images", [imgs["one.png"], imgs["two.png"]], "Which image has more shapes?", "second"),
        ("grounding", [imgs["three.png"]], "Where is the blue square? Answer with a point (x, y).", "(110, 35)"),
    ]
    with KimiVL.load(res.text_path, res.mmproj_path, n_ctx=2048) as model:
        for title, images, q, expected in questions:
            msg = [user_message(q, [str(i) for i in images])]
            stream = model.stream(msg, max_tokens=args.max_tokens, temperature=0)
            answer = "".join(p.text for p in stream)
            st = stream.stats
            print(f"\n[{title}] {', '.join(i.name for i in images)}\nQ: {q}\nA: {answer!r}   (expected: {expected})")
            print(f"   {st.image_tokens} image tokens, encode {st.encode_seconds:.2f} s, prefill "
                  f"{st.evaluated_tokens} tok at {st.prefill_tps:.0f} tok/s, decode {st.generated_tokens} tok at "
                  f"{st.decode_tps:.0f} tok/s")
            if title == "grounding":
                marked = draw_point(images[0], answer)
                print(f"   marker drawn on {marked}" if marked else "   (no (x, y) point in the answer)")
    print("\nWith a real checkpoint (downloaded to the HF cache or a directory; q4_k_edge is 9.55 GB against Q4_K_M's "
          "10.5 GB, see the README):\n"
          "  .venv/bin/kimivl-edge convert moonshotai/Kimi-VL-A3B-Instruct --outtype q4_k_edge --mmproj-type q8_0 "
          "--outdir models\n"
          "  .venv/bin/kimivl-edge chat -m models/Kimi-VL-A3B-Instruct-Q4_K_EDGE.gguf "
          "--mmproj models/mmproj-Kimi-VL-A3B-Instruct-Q8_0.gguf")
    return 0
