"""`kimivl-edge demo`: the main job on the bundled tiny model, end to end, in one command.

Today that is: make the tiny checkpoint (`synth`, cached under ~/.cache/kimivl-edge), draw a test image, and answer
a question about it with the fp32 reference. The tiny weights are random until the trained fixture lands, so the
answer is not meaningful yet; every stage of the pipeline runs for real.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("KIMIVL_EDGE_CACHE", Path.home() / ".cache" / "kimivl-edge"))


def demo_image(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (300, 200), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((30, 50, 130, 150), fill="red")
    d.rectangle((180, 60, 260, 140), fill="blue")
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser
    from .synth import synth

    ap = OneLineParser(prog="kimivl-edge demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "Kimi-VL-A3B-Instruct-tiny"
    if not (ckpt / "model.safetensors.index.json").is_file():
        synth(ckpt, "tiny", "instruct", seed=0, force=True)
        print(f"made the tiny checkpoint: {ckpt}")
    image = demo_image(root / "demo.png")
    question = "Which side is the red circle on?"
    from .reference.model import ReferenceModel
    from .reference.run import build_messages

    model = ReferenceModel(ckpt)
    prepared = model.prepare(build_messages(question, [str(image)]))
    print(f"image {image} -> grid {prepared.grid_hws.tolist()}, prompt of {len(prepared.input_ids)} tokens")
    answer = model.decode_answer(model.generate_ids(prepared, args.max_tokens))
    print(f"Q: {question}\nA (fp32 reference, random tiny weights): {answer!r}")
    return 0
