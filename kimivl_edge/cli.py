"""`kimivl-edge VERB ...`: one module per verb, each with its own ``main(argv)``.

User errors (KimiVLError, bad arguments) print one line on stderr and exit with code 2; no traceback.
A reader that goes away (``kimivl-edge run ... | head``) ends the verb quietly with code 141, as a shell reports a
coreutils tool killed by SIGPIPE (128 + 13).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import KimiVLError

EXIT_BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE

# verb -> (module, one-line help)
VERBS = {
    "synth": ("kimivl_edge.synth", "write a synthetic checkpoint in the exact Hugging Face layout"),
    "convert": ("kimivl_edge.convert.cli", "convert an HF checkpoint to a text GGUF + mmproj GGUF (quantized)"),
    "run": ("kimivl_edge.run", "answer one prompt (with images), streamed"),
    "chat": ("kimivl_edge.chat", "interactive chat with images (REPL)"),
    "serve": ("kimivl_edge.serve", "an OpenAI-compatible HTTP server (chat completions with images)"),
    "demo": ("kimivl_edge.demo", "run the main job on the bundled tiny model"),
    "reference": ("kimivl_edge.reference.run", "answer with the fp32 torch reference (needs the reference extra)"),
    "imatrix": ("kimivl_edge.imatrix", "collect an importance matrix (calibration chats with images) for convert"),
    "verify": ("kimivl_edge.verify", "check a GGUF pair against its checkpoint's fp32 reference (needs torch)"),
    "bench": ("kimivl_edge.bench", "benchmarks side by side with llama.cpp"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (and exit code 2), as everywhere else."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _dispatch(sys.argv[1:] if argv is None else list(argv))
        finally:  # also on argparse's SystemExit (--help): a closed pipe shows here, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kimivl-edge VERB [options]\n\nverbs:")
        for verb, (_, text) in VERBS.items():
            print(f"  {verb:8s} {text}")
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"kimivl-edge: error: unknown verb {verb!r} (choose from {', '.join(VERBS)})", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(VERBS[verb][0]).main(rest) or 0
    except KimiVLError as e:
        print(f"kimivl-edge {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kimivl-edge {verb}: interrupted", file=sys.stderr)
        return 130


def _reader_gone() -> int:
    """stdout's reader has gone: point stdout at /dev/null so that the interpreter's final flush of what is still
    buffered neither fails nor prints "Exception ignored" (the recipe of Python's ``signal`` docs, "Note on
    SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
