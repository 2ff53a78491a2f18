"""`kimivl-edge chat`: an interactive REPL (llama-mtmd-cli style) with images and history.

    kimivl-edge chat -m MODEL.gguf --mmproj MMPROJ.gguf [--temp T] ...

Commands: /image PATH, /video PATH, /pdf PATH [PAGES] (attach to the next message), /clear (forget the
conversation), /quit.
The KV cache is reused across turns: a follow-up only evaluates the new tokens, and an image is encoded once.
"""
from __future__ import annotations

import sys

from .cli_common import add_model_args, add_sampling_args, load_model, print_stream, sampling
from .media_cli import add_media_args, attach, media_settings, report, with_media
from .prompt import user_message


def repl(model, settings, inp=sys.stdin, out=sys.stdout, err=sys.stderr) -> None:
    history: list[dict] = []
    pending: list[str] = []
    media: list[dict] = []  # /video and /pdf parts for the next message
    interactive = inp.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            history, pending, media = [], [], []
            err.write("(conversation cleared)\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                from .image import load_image

                load_image(path)
            except Exception as e:  # report and keep the session
                err.write(f"error: {e}\n")
                continue
            pending.append(path)
            err.write(f"(image {path} attached to the next message)\n")
            continue
        if line.split(" ")[0] in ("/video", "/pdf"):
            attach(model, line, media, err)
            continue
        if line.startswith("/"):
            err.write("commands: /image PATH, /clear, /quit, /video PATH, /pdf PATH [PAGES]\n")
            continue
        msg = with_media(user_message(line, pending), media)
        try:
            answer, st = print_stream(model, history + [msg], settings, out, err)
        except Exception as e:
            from .errors import KimiVLError

            if not isinstance(e, KimiVLError):
                raise
            err.write(f"error: {e}\n")
            continue
        report(st.media, err)
        history += [msg, {"role": "assistant", "content": answer}]
        pending, media = [], []


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge chat", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    add_sampling_args(ap)
    add_media_args(ap)
    args = ap.parse_args(argv)
    settings = sampling(args)
    media = media_settings(args)
    model = load_model(args)
    model.media_settings = media
    try:
        repl(model, settings)
    finally:
        model.close()
    return 0
