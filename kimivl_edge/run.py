"""`kimivl-edge run`: one question (with images) -> the answer, streamed to stdout.

    kimivl-edge run -m MODEL.gguf --mmproj MMPROJ.gguf [--image PATH]... -p PROMPT [--temp T] [--max-tokens N]
                    [--seed S] [--threads N] [--ctx N] [--vision-backend numpy|ggml] [--max-image-patches N]
                    [--mmap auto|on|off] [--no-repack]

Thinking models: the reasoning goes to stderr (labelled "Thinking:", then "Answer:"), the answer to stdout.
"""
from __future__ import annotations

import sys
from contextlib import closing

from .cli_common import add_model_args, add_sampling_args, load_model, print_stream, sampling
from .prompt import user_message


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge run", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    ap.add_argument("-p", "--prompt", required=True)
    add_sampling_args(ap)
    ap.add_argument("--stats", action="store_true", help="print timings to stderr")
    args = ap.parse_args(argv)
    settings = sampling(args)
    if args.image and not args.mmproj:
        ap.error("--image needs --mmproj")
    with load_model(args) as model, closing(model.stream([user_message(args.prompt, args.image)], settings)) as stream:
        print_stream(stream)
    st = stream.stats
    if args.stats:
        print(f"image tokens {st.image_tokens}, encode {st.encode_seconds:.2f} s, prefill {st.evaluated_tokens} tok "
              f"{st.prefill_tps:.1f} tok/s, decode {st.generated_tokens} tok {st.decode_tps:.1f} tok/s",
              file=sys.stderr)
    return 0
