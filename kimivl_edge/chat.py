"""`kimivl-edge chat`: an interactive REPL (llama-mtmd-cli style) with images and history.

    kimivl-edge chat -m MODEL.gguf --mmproj MMPROJ.gguf [--temp T] ...

Commands: /image PATH, /video PATH, /pdf PATH [PAGES] (attach to the next message), /clear
(forget the conversation), /quit (or Ctrl-D).
On a terminal: line editing and history (readline), a banner on stderr naming the model and the commands, and
Ctrl-C stops the current answer or image encode, not the session. Piped input gets no banner and no prompt.
A message that fails or is interrupted leaves the conversation as it was before it: the earlier turns, and the
images attached for it (they stay attached: retype a message to retry, or /clear to drop them with the history).
When the history, the new message and a full answer (--max-tokens, at most half the context) do not fit --ctx,
the oldest turns are left out and one line says how many.
The KV cache is reused across turns: a follow-up only evaluates the new tokens, and an image is encoded once.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import closing
from typing import TYPE_CHECKING, TextIO

from .cli_common import add_model_args, add_sampling_args, load_model, print_stream, sampling
from .media_cli import add_media_args, attach, media_settings, report, with_media
from .errors import KimiVLError, UsageError
from .prompt import user_message

if TYPE_CHECKING:
    from .model import KimiVL
    from .sampling import SamplingSettings

HELP = "commands: /image PATH, /video PATH, /pdf PATH [PAGES], /clear, /quit"


class Chat:
    """A conversation: the finished turns, and the images attached to the next message. Only a message answered
    to the end changes either."""

    def __init__(self, model: KimiVL, settings: SamplingSettings, out: TextIO, err: TextIO):
        self.model, self.settings, self.out, self.err = model, settings, out, err
        self.history: list[dict] = []
        self.pending: list[str] = []
        self.media: list[dict] = []  # /video and /pdf parts for the next message

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def handle(self, line: str) -> bool:
        """Act on one line of input; False when the user leaves."""
        line = line.strip()
        if not line.startswith("/"):
            if line:
                self.ask(line)
            return True
        cmd, _, arg = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/clear":
            self.history, self.pending, self.media = [], [], []
            self.say("(conversation cleared)")
        elif cmd == "/image":
            self.attach(arg.strip())
        elif cmd in ("/video", "/pdf"):
            attach(self.model, line, self.media, self.err)
        else:
            self.say(HELP)
        return True

    def attach(self, path: str) -> None:
        """Check the image now (readable, and the model can see images), so the next message does not fail on it."""
        if not path:
            self.say("usage: /image PATH")
            return
        if self.model.vision is None:
            self.say("error: images need --mmproj (this chat was started without it)")
            return
        from .image import load_image

        load_image(path)
        self.pending.append(path)
        self.say(f"(image {path} attached to the next message)")

    def ask(self, text: str) -> None:
        msg = with_media(user_message(text, self.pending), self.media)
        kept = self.fit(msg)
        with closing(self.model.stream(kept + [msg], self.settings)) as stream:
            answer = print_stream(stream, self.out, self.err)
        report(stream.stats.media, self.err)
        self.history = kept + [msg, {"role": "assistant", "content": answer}]
        self.pending, self.media = [], []

    def fit(self, msg: dict) -> list[dict]:
        """The newest whole turns of the history with which ``msg`` and a full answer (--max-tokens, at most half
        the context) fit the context; one line says how many older turns that leaves out. Without any earlier turn
        the prompt alone must fit, else a UsageError says what to change."""
        n_ctx = self.model.decoder.n_ctx
        room = min(self.settings.max_tokens, n_ctx // 2)
        for start in range(0, len(self.history) + 1, 2):  # the history holds (user, assistant) pairs
            kept = self.history[start:]
            n = self.model.render_prompt(kept + [msg], check_fit=False).n_tokens
            if n + room <= n_ctx or (not kept and n < n_ctx):
                if start:
                    self.say(f"(context full: the {start // 2} oldest turn(s) are left out from now on)")
                return kept
        fixes = "a larger --ctx, or a smaller --max-image-patches; /clear detaches the images" if self.pending \
            else "a larger --ctx"
        raise UsageError(f"this message needs {n} tokens, more than the context of {n_ctx}; it needs {fixes}")


def banner(model: KimiVL, err: TextIO) -> None:
    images = "images: /image PATH" if model.vision is not None else "no images (started without --mmproj)"
    err.write(f"kimivl-edge chat: {model.info.path.name} ({model.info.variant}, context {model.decoder.n_ctx} "
              f"tokens; {images})\n{HELP}. Ctrl-C stops an answer, Ctrl-D leaves; when the context is full, the "
              "oldest turns are left out.\n")
    err.flush()


def terminal_lines(out: TextIO) -> Iterator[str]:
    """The user's lines from a terminal, through readline (line editing, history). With stdout on the terminal too,
    readline reads keys in non-canonical mode, so lines are not cut at the 4095 bytes of a canonical-mode terminal.
    Ctrl-C at the prompt starts a fresh line; Ctrl-D ends."""
    import readline  # noqa: F401  (imported, it gives input() line editing and history)

    while True:
        try:
            yield input("> ")
        except KeyboardInterrupt:
            out.write("\n")
        except EOFError:
            out.write("\n")
            return


def repl(model: KimiVL, settings: SamplingSettings, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> None:
    """Read lines from ``inp`` (a terminal: sys.stdin through readline) until /quit or its end."""
    interactive = inp is sys.stdin and inp.isatty()
    if interactive:
        banner(model, err)
    lines: Iterable[str] = terminal_lines(out) if interactive else inp
    chat = Chat(model, settings, out, err)
    for line in lines:
        try:
            if not chat.handle(line):
                return
        except KeyboardInterrupt:
            chat.say("\n(interrupted: the conversation is as before that message)")
        except KimiVLError as e:
            chat.say(f"error: {e}")


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge chat", description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    add_sampling_args(ap)
    add_media_args(ap)
    args = ap.parse_args(argv)
    settings = sampling(args)
    media = media_settings(args)
    with load_model(args) as model:
        model.media_settings = media
        repl(model, settings)
    return 0
