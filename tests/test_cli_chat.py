"""`kimivl-edge run` and `kimivl-edge chat` as a user drives them: stdout/stderr, commands, history, exit codes."""
from __future__ import annotations

import fcntl
import io
import itertools
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from PIL import Image

from shared import run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_checkpoint, converted) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    text, mm = converted(tiny_checkpoint("thinking", seed=4), "f32", "f16")
    img = root / "red.png"
    Image.new("RGB", (120, 80), "red").save(img)
    return text, mm, img


def test_run_streams_an_answer(pair):
    text, mm, img = pair
    r = run_cli("run", "-m", str(text), "--mmproj", str(mm), "--image", str(img), "-p", "What colour?",
               "--temp", "0", "--max-tokens", "8", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")
    assert "image tokens 15" in r.stderr  # 120x80 pads to 140x84: 6x10 patches, 60/4 = 15 tokens (docs/model.md §4)


def test_run_mmap_choices_give_the_same_answer(pair):
    text, _, _ = pair
    outs = []
    for choice in ("auto", "on", "off"):
        r = run_cli("run", "-m", str(text), "-p", "Hi", "--temp", "0", "--max-tokens", "6", "--mmap", choice,
                   "--repeat-penalty", "1.3")
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] == outs[2]
    r = run_cli("run", "-m", str(text), "-p", "Hi", "--temp", "0", "--max-tokens", "6", "--no-repack")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_chat_repl_commands_and_history(pair):
    text, mm, img = pair
    script = f"/image {img}\nWhat colour is it?\n/image /nonexistent.png\nAnd now?\n/help\n/clear\nHello\n/quit\n"
    r = run_cli("chat", "-m", str(text), "--mmproj", str(mm), "--temp", "0", "--max-tokens", "4", stdin=script)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert f"(image {img} attached to the next message)" in err
    assert "error: /nonexistent.png: image file not found" in err
    assert "commands: /image PATH, /video PATH, /pdf PATH [PAGES], /clear, /quit" in err
    assert "(conversation cleared)" in err
    assert r.stdout.count("\n") >= 3  # three answered turns


def test_chat_without_mmproj_refuses_images_but_keeps_going(pair):
    text, _, img = pair
    r = run_cli("chat", "-m", str(text), "--max-tokens", "2", stdin=f"/image {img}\nhi\nhello\n")
    assert r.returncode == 0, r.stderr
    assert "error:" in r.stderr and "mmproj" in r.stderr


@pytest.mark.parametrize("args", [
    ["run", "-p", "x"],                                   # no model
    ["run", "-m", "nope.gguf", "-p", "x"],                # missing file
    ["run", "-m", "{text}", "-p", "x", "--temp", "-1"],   # bad sampling value
    ["run", "-m", "{text}", "-p", "x", "--image", "{img}"],  # image without mmproj
    ["run", "-m", "{text}", "-p", "x", "--mmap", "maybe"],   # unknown mmap choice
])
def test_run_bad_arguments_exit_2(pair, args):
    text, _, img = pair
    args = [a.format(text=text, img=img) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


# -- chat never gets stuck: a failed or interrupted message leaves the conversation as it was -------------------

@pytest.fixture
def load(pair):
    """``load(n_ctx=1024, mmproj=True)``: a KimiVL on the module's pair, one thread, closed after the test."""
    from kimivl_edge import KimiVL

    models = []

    def get(n_ctx: int = 1024, mmproj: bool = True):
        models.append(KimiVL.load(pair[0], pair[1] if mmproj else None, n_ctx=n_ctx, n_threads=1))
        return models[-1]

    yield get
    for m in models:
        m.close()


def settings(max_tokens: int = 6):
    from kimivl_edge.sampling import SamplingSettings

    return SamplingSettings(temperature=0, max_tokens=max_tokens)


def talk(model, script: str, max_tokens: int = 6) -> tuple[str, str]:
    """``repl`` over a script, as piped stdin: (stdout, stderr)."""
    from kimivl_edge.chat import repl

    out, err = io.StringIO(), io.StringIO()
    repl(model, settings(max_tokens), io.StringIO(script), out, err)
    return out.getvalue(), err.getvalue()


def new_chat(model, max_tokens: int = 6):
    from kimivl_edge.chat import Chat

    return Chat(model, settings(max_tokens), io.StringIO(), io.StringIO())


def record_streams(monkeypatch, model) -> list[list[dict]]:
    """The messages of every turn the chat asks the model for."""
    calls: list[list[dict]] = []
    real = model.stream

    def stream(messages, s):
        calls.append(list(messages))
        return real(messages, s)

    monkeypatch.setattr(model, "stream", stream)
    return calls


def test_image_without_mmproj_is_refused_at_image_time(load, pair):
    _, _, img = pair
    model = load(mmproj=False)
    chat = new_chat(model)
    chat.handle(f"/image {img}")
    assert "error: images need --mmproj" in chat.err.getvalue() and chat.pending == []
    chat.handle("hi")
    assert [m["content"] for m in chat.history[::2]] == ["hi"]
    _, err = talk(model, f"/image {img}\nhi\nhello\n")
    assert err.count("error:") == 1, err


def test_image_with_no_path_prints_its_usage(load):
    _, err = talk(load(), "/image\n/image   \n")
    assert err.splitlines() == ["usage: /image PATH"] * 2


def image_paths(message: dict) -> list:
    return [p["image"] for p in message["content"] if p.get("type") == "image"]


def test_a_failed_message_leaves_history_and_images_as_they_were(load, pair, monkeypatch, tmp_path):
    from kimivl_edge.errors import KimiVLError

    _, _, img = pair
    img2 = tmp_path / "green.png"
    Image.new("RGB", (90, 60), "green").save(img2)
    model = load()
    chat = new_chat(model)
    chat.handle(f"/image {img}")
    chat.handle("What colour?")
    before = list(chat.history)
    chat.handle(f"/image {img2}")

    def broken(*a, **k):
        raise KimiVLError("encoder failed")

    with monkeypatch.context() as m:
        m.setattr(model.vision, "encode", broken)
        with pytest.raises(KimiVLError):
            chat.handle("And this one?")
    assert chat.history == before and chat.pending == [str(img2)]
    chat.handle("And this one?")  # the same message again works, with its image
    assert chat.history[:2] == before and image_paths(chat.history[2]) == [str(img2)] and chat.pending == []


def test_ctrl_c_during_an_encode_keeps_the_image_attached(load, pair, monkeypatch):
    _, _, img = pair
    model = load()
    chat = new_chat(model)
    chat.handle(f"/image {img}")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(model.vision, "encode", interrupted)
        with pytest.raises(KeyboardInterrupt):
            chat.handle("What colour?")
    assert chat.history == [] and chat.pending == [str(img)]
    chat.handle("What colour?")
    assert image_paths(chat.history[0]) == [str(img)]


class InterruptedAfterOnePiece:
    """A turn that the user stops with Ctrl-C after its first piece."""

    def __init__(self, stream):
        self.stream, self.stats = stream, stream.stats

    def __iter__(self):
        yield from itertools.islice(self.stream, 1)
        raise KeyboardInterrupt

    def close(self):
        self.stream.close()


def test_an_interrupted_answer_is_not_kept(load, monkeypatch):
    model = load()
    calls = record_streams(monkeypatch, model)
    recorded = model.stream
    turns = iter([InterruptedAfterOnePiece, lambda s: s, lambda s: s])
    monkeypatch.setattr(model, "stream", lambda msgs, s: next(turns)(recorded(msgs, s)))
    _, err = talk(model, "First question\nSecond question\nThird question\n")
    assert "(interrupted: the conversation is as before that message)" in err and "error:" not in err, err
    assert [m["content"] for m in calls[1]] == ["Second question"]
    assert [m["content"] for m in calls[2][::2]] == ["Second question", "Third question"]


def test_history_that_outgrows_the_context_drops_the_oldest_turns(load, monkeypatch):
    model = load(n_ctx=256)
    calls = record_streams(monkeypatch, model)
    questions = [f"Question {i}: which colour is the large shape on the left of the picture?" for i in range(12)]
    _, err = talk(model, "\n".join(questions) + "\n", max_tokens=16)
    assert "error:" not in err and "oldest turn(s) are left out from now on" in err, err
    assert len(calls) == len(questions)
    for q, msgs in zip(questions, calls):  # every question was asked, after a tail of the earlier ones
        asked = [m["content"] for m in msgs[::2]]
        assert asked[-1] == q and asked == questions[questions.index(asked[0]):questions.index(q) + 1]
    assert len(calls[-1]) < 2 * len(questions) - 1  # some turns were left out


def test_a_message_too_long_for_the_context_says_so_and_changes_nothing(load):
    from kimivl_edge.errors import UsageError

    chat = new_chat(load(n_ctx=256))  # llama.cpp's smallest context: it pads n_ctx to a multiple of 256
    chat.handle("Hi")
    before = list(chat.history)
    with pytest.raises(UsageError, match=r"this message needs \d+ tokens, more than the context of 256"):
        chat.handle("word " * 400)
    assert chat.history == before and len(before) == 2


def test_chat_gives_no_banner_to_piped_input(pair):
    text, _, _ = pair
    r = run_cli("chat", "-m", str(text), "--max-tokens", "2", stdin="hi\n")
    assert r.returncode == 0 and "kimivl-edge chat:" not in r.stderr and "> " not in r.stdout, r.stderr


def test_a_10_kb_line_through_stdin_arrives_whole(pair):
    from kimivl_edge.gguf_model import TextModelInfo

    text, _, _ = pair
    line = "The quick brown fox jumps over the lazy dog. " * 230
    n_line = len(TextModelInfo.read(text).tokenizer.encode(line))
    ctx = n_line // 256 * 256  # llama.cpp pads the context to a multiple of 256: the whole line cannot fit
    r = run_cli("chat", "-m", str(text), "--ctx", str(ctx), "--max-tokens", "2", "--threads", "1",
                stdin=line + "\nhi\n")
    assert r.returncode == 0, r.stderr
    needs = re.search(r"this message needs (\d+) tokens", r.stderr)
    assert len(line) > 10_000 and needs and int(needs[1]) > n_line, r.stderr  # the whole line, with the template
    assert r.stderr.count("error:") == 1, r.stderr  # and the next message is answered


# -- thinking output is labelled -------------------------------------------------------------------------------

class Script:
    """A turn as ``print_stream`` reads it: pieces, then its figures."""

    def __init__(self, pieces: list[tuple[str, str]], finish_reason: str):
        from kimivl_edge.model import Piece, Stats

        self.pieces = [Piece(k, t) for k, t in pieces]
        self.stats = Stats(finish_reason=finish_reason)

    def __iter__(self):
        return iter(self.pieces)


CUT = "(stopped at the token limit, --max-tokens or the context: "


@pytest.mark.parametrize("pieces,finish,stdout,stderr", [
    ([("reasoning", "Round."), ("reasoning", " Red."), ("answer", "A red circle.")], "stop",
     "A red circle.\n", "Thinking:\nRound. Red.\nAnswer:\n"),
    ([("reasoning", "Round and")], "length", "\n",
     "Thinking:\nRound and\n" + CUT + "inside the reasoning: no answer)\n"),
    ([("answer", "A red")], "length", "A red\n", CUT + "the answer is cut)\n"),
    ([("answer", "A red circle.")], "stop", "A red circle.\n", ""),
])
def test_print_stream_labels_reasoning_and_answer(pieces, finish, stdout, stderr):
    from kimivl_edge.cli_common import print_stream

    out, err = io.StringIO(), io.StringIO()
    assert print_stream(Script(pieces, finish), out, err) == stdout[:-1]
    assert (out.getvalue(), err.getvalue()) == (stdout, stderr)


SCRIPTED_RUN = """
import sys
from kimivl_edge.gguf_model import TextModelInfo
from kimivl_edge.sampling import SamplerChain
tok = TextModelInfo.read(sys.argv[1]).tokenizer
ids = iter(tok.encode(sys.argv[2]) + sorted(tok.stop_ids)[:1])
SamplerChain.sample = lambda self, ctx: next(ids)  # the model "writes" argv[2], then stops
from kimivl_edge.cli import main
sys.exit(main(["run", "-m", sys.argv[1], "-p", "What is it?"] + sys.argv[3:]))
"""


def test_run_labels_a_thinking_answer(pair):
    text, _, _ = pair
    said = "\u25c1think\u25b7The shape is round.\u25c1/think\u25b7A red circle."
    r = subprocess.run([sys.executable, "-c", SCRIPTED_RUN, str(text), said], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "A red circle.\n" and r.stderr == "Thinking:\nThe shape is round.\nAnswer:\n", r.stderr
    r = subprocess.run([sys.executable, "-c", SCRIPTED_RUN, str(text), said, "--max-tokens", "12"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n" and r.stderr.startswith("Thinking:\nThe") and r.stderr.endswith(
        CUT + "inside the reasoning: no answer)\n"), r.stderr


# -- chat on a terminal: banner, progress, readline, Ctrl-C, Ctrl-D, long pasted lines ---------------------------

class Terminal:
    """``kimivl-edge ARGS`` on a pseudo-terminal, driven as a person does: it types, reads what the terminal shows,
    presses Ctrl-C (the terminal sends SIGINT) and Ctrl-D."""

    def __init__(self, *args: str):
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal
            env = {**os.environ, "TERM": "xterm"}
            os.execve(sys.executable, [sys.executable, "-m", "kimivl_edge", *args], env)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.pid, self.fd = pid, fd
        self.shown, self.seen, self.ended = bytearray(), 0, False
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child has gone
                data = b""
            with self.cond:
                self.shown += data
                self.ended = not data
                self.cond.notify_all()
            if not data:
                return

    def expect(self, pattern: bytes, timeout: float = 240) -> re.Match:
        """Wait until the terminal shows ``pattern`` (a regex) after what was already matched."""
        rx = re.compile(pattern)
        with self.cond:
            found = self.cond.wait_for(lambda: rx.search(self.shown, self.seen) or self.ended, timeout)
            m = rx.search(self.shown, self.seen)
            assert m, f"{pattern!r} not shown ({'ended' if found else 'timed out'}); tail: {bytes(self.shown[-600:])!r}"
            self.seen = m.end()
            return m

    def type(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view[:1024]):]

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


PROMPT = rb"> (\x1b\[[0-9;?]*[a-zA-Z])*$"  # readline's prompt, maybe followed by terminal modes


def test_chat_on_a_terminal_pastes_10_kb_shows_progress_and_quits_on_ctrl_d(pair):
    from kimivl_edge.gguf_model import TextModelInfo

    text, mm, _ = pair
    tokenizer = TextModelInfo.read(text).tokenizer
    line = "The quick brown fox jumps over the lazy dog. " * 230
    n_line = len(tokenizer.encode(line))
    term = Terminal("chat", "-m", str(text), "--mmproj", str(mm), "--ctx", "4096", "--max-tokens", "4",
                    "--threads", "1")
    term.expect(rb"loading model: 100%")
    term.expect(rb"kimivl-edge chat: .*\(thinking, context 4096 tokens; images: /image PATH\)")
    term.expect(rb"commands: /image PATH, /video PATH, /pdf PATH \[PAGES\], /clear, /quit\. "
                rb"Ctrl-C stops an answer, Ctrl-D leaves")
    term.expect(PROMPT)
    term.type(line.encode() + b"\r")  # longer than a canonical-mode terminal line (4095 bytes)
    needs = term.expect(rb"this message needs (\d+) tokens, more than the context of 4096")
    assert len(line) > 10_000 and int(needs[1]) > n_line > 4096  # the whole line came through, with the template
    term.expect(PROMPT)
    medium = "The quick brown fox jumps over the lazy dog. " * 15  # a prefill of a few hundred positions
    term.type(medium.encode() + b"\r")
    done = term.expect(rb"reading the prompt: (\d+)/\1 tokens")
    assert int(done[1]) > len(tokenizer.encode(medium)) >= 256
    term.expect(PROMPT)
    term.type(b"\x04")  # Ctrl-D
    assert term.exit_code() == 0
    assert term.shown.count(b"error") == 1 and b"Traceback" not in term.shown


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_checkpoint, converted):
    # an Instruct model: a Thinking model's text before its first marker is held back until a marker decides it
    # (docs/model.md §7.4), and the random tiny weights never write one, so nothing would stream
    text, _ = converted(tiny_checkpoint("instruct", seed=4), "f32", "f16")
    # room for an answer far longer than the time a busy machine takes to deliver the Ctrl-C (600 tokens finished
    # first once, in CI)
    term = Terminal("chat", "-m", str(text), "--temp", "1", "--ctx", "4096", "--max-tokens", "4000", "--threads", "1")
    term.expect(PROMPT)
    term.type(b"Tell me a long story.\r")
    term.expect(rb"Tell me a long story\.\r\n(?s:.{20})")  # the answer is streaming
    term.type(b"\x03")  # Ctrl-C
    term.expect(rb"\(interrupted: the conversation is as before that message\)")
    term.expect(PROMPT)
    term.type(b"Hello\r")
    term.expect(rb"Hello\r\n(.|\n)+" + PROMPT)  # answered to the end: a fresh prompt
    term.type(b"\x04")
    assert term.exit_code() == 0
    assert b"error" not in term.shown and b"Traceback" not in term.shown
