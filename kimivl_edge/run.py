"""`kimivl-edge run`: one question (with images) -> the answer, streamed to stdout.

    kimivl-edge run -m MODEL.gguf --mmproj MMPROJ.gguf [--image PATH]... -p PROMPT [--temp T] [--max-tokens N]
                    [--seed S] [--threads N] [--ctx N] [--vision-backend numpy|ggml] [--max-image-patches N]
                    [--mmap auto|on|off] [--no-repack]
                    [--video PATH]... [--pdf PATH [--pages 1-20]] [--fps F] [--max-frames N] ...
                    [--grammar-file FILE]
    kimivl-edge run -m MODEL.gguf --mmproj MMPROJ.gguf --ground "INSTRUCTION" --image shot.png [--draw OUT.png]

Thinking models: the reasoning goes to stderr (labelled "Thinking:", then "Answer:"), the answer to stdout.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import closing
from dataclasses import replace
from pathlib import Path

from .cli_common import add_model_args, add_sampling_args, load_model, print_stream, sampling
from .errors import UsageError, one_line
from .media_cli import add_media_args, media_settings, print_grounding, report
from .prompt import user_message


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge run", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    ap.add_argument("--video", action="append", default=[], help="video file: mp4/webm/mkv/mov, GIF/WebP (repeat)")
    ap.add_argument("--pdf", action="append", default=[], help="PDF file, its pages as images (repeat)")
    ap.add_argument("--pages", help="PDF pages to use, e.g. 1-20 or 1-3,7,10- (default: all, up to --max-pages)")
    ap.add_argument("-p", "--prompt")
    ap.add_argument("--ground", metavar="INSTRUCTION", help="OS-agent grounding on the --image screenshot with the "
                    "model card's prompt; prints the parsed actions in pixels")
    ap.add_argument("--draw", metavar="OUT", help="with --ground: write the screenshot with the actions drawn")
    add_media_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--grammar-file", metavar="FILE", help="GBNF grammar (llama.cpp's format, as its "
                    "--grammar-file): the answer is only what the grammar admits")
    ap.add_argument("--stats", action="store_true", help="print timings to stderr")
    args = ap.parse_args(argv)
    settings = sampling(args)
    if args.grammar_file:
        settings = replace(settings, grammar=read_grammar(args.grammar_file))
    media = media_settings(args)
    if (args.prompt is None) == (args.ground is None):
        ap.error("give exactly one of -p/--prompt and --ground")
    if args.ground is not None and len(args.image) != 1:
        ap.error("--ground needs exactly one --image (the screenshot)")
    if args.draw and args.ground is None:
        ap.error("--draw needs --ground")
    if (args.image or args.video or args.pdf) and not args.mmproj:
        ap.error("--image, --video and --pdf need --mmproj")
    if args.pages and not args.pdf:
        ap.error("--pages needs --pdf")
    if args.ground is not None:
        from .grounding import ground_prompt

        args.prompt = ground_prompt(args.ground)
    message = user_message(args.prompt, args.image, args.video, args.pdf, args.pages)
    with load_model(args) as model:
        model.media_settings = media
        with closing(model.stream([message], settings)) as stream:
            answer = print_stream(stream)
    st = stream.stats
    report(st.media, verbose=args.stats)
    if args.ground is not None:
        print_grounding(answer, args.image[0], args.draw)
    if args.stats:
        print(f"image tokens {st.image_tokens}, restored {st.restored_tokens} tok from the prefix cache "
              f"{st.restore_seconds:.2f} s, encode {st.encode_seconds:.2f} s, prefill {st.evaluated_tokens} tok "
              f"{st.prefill_tps:.1f} tok/s, decode {st.generated_tokens} tok {st.decode_tps:.1f} tok/s",
              file=sys.stderr)
    return 0


def read_grammar(path: str) -> str:
    """The text of a GBNF grammar file, checked by llama.cpp's own parser before anything loads; a missing,
    unreadable, empty or malformed file is a UsageError."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the grammar ({one_line(e)})") from None
    if not text.strip():
        raise UsageError(f"{path}: the grammar file is empty")
    problem = _grammar_problem(text)
    if problem:
        raise UsageError(f"{path}: not a valid grammar ({problem})")
    return text


def _grammar_problem(text: str) -> str | None:
    """llama.cpp's diagnostic for ``text`` (None when it parses). The parser prints it on the C stderr, so that is
    captured here and said in one line. Token literals (``<[123]>``) need the model's vocabulary: such a grammar
    is checked again when the answer starts."""
    import llama_cpp as lc

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as diag:
        os.dup2(diag.fileno(), 2)
        try:
            sampler = lc.llama_sampler_init_grammar(None, text.encode(), b"root")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if sampler:
            lc.llama_sampler_free(sampler)
            return None
        diag.seek(0)
        said = diag.read().decode("utf-8", "replace")
    if "no vocab to parse token" in said:
        return None
    return " ".join(said.split())[:200] or "llama.cpp could not parse it"
