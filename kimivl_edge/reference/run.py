"""`kimivl-edge reference`: answer with the fp32 reference model (torch) straight from an HF checkpoint directory.

    kimivl-edge reference CHECKPOINT_DIR --prompt TEXT [--image PATH ...] [--max-tokens N]

Exact but slow and memory-hungry (fp32: 4 bytes per parameter touched); it is the yardstick for the quantized
runtime. Needs the `reference` extra (torch).
"""
from __future__ import annotations

from ..prompt import user_message


def build_messages(prompt: str, images: list[str]) -> list[dict]:
    return [user_message(prompt, images)]


def main(argv: list[str] | None = None) -> int:
    from ..cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="Hugging Face checkpoint directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be >= 1")
    from .model import ReferenceModel

    model = ReferenceModel(args.checkpoint)
    print(model.generate(build_messages(args.prompt, args.image), args.max_tokens))
    return 0
