"""`kimivl-edge run` and `kimivl-edge chat` as a user drives them: stdout/stderr, commands, history, exit codes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kimivl_edge.convert import convert_checkpoint
from kimivl_edge.synth import synth


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    ck = synth(root / "Kimi-VL-A3B-Thinking", "tiny", "thinking", seed=4)
    text, mm = convert_checkpoint(ck, "q8_0", "f16", root / "g")
    img = root / "red.png"
    Image.new("RGB", (120, 80), "red").save(img)
    return text, mm, img


def kimivl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kimivl_edge", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_run_streams_an_answer(pair):
    text, mm, img = pair
    r = kimivl("run", "-m", str(text), "--mmproj", str(mm), "--image", str(img), "-p", "What colour?",
               "--temp", "0", "--max-tokens", "8", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")
    assert "image tokens 15" in r.stderr  # 120x80 pads to 140x84: 6x10 patches, 60/4 = 15 tokens (docs/model.md §4)


def test_run_mmap_choices_give_the_same_answer(pair):
    text, _, _ = pair
    outs = []
    for choice in ("auto", "on", "off"):
        r = kimivl("run", "-m", str(text), "-p", "Hi", "--temp", "0", "--max-tokens", "6", "--mmap", choice,
                   "--repeat-penalty", "1.3")
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] == outs[2]
    r = kimivl("run", "-m", str(text), "-p", "Hi", "--temp", "0", "--max-tokens", "6", "--no-repack")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_chat_repl_commands_and_history(pair):
    text, mm, img = pair
    script = f"/image {img}\nWhat colour is it?\n/image /nonexistent.png\nAnd now?\n/help\n/clear\nHello\n/quit\n"
    r = kimivl("chat", "-m", str(text), "--mmproj", str(mm), "--temp", "0", "--max-tokens", "4", stdin=script)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert f"(image {img} attached to the next message)" in err
    assert "error: /nonexistent.png: image file not found" in err
    assert "commands: /image PATH, /clear, /quit" in err
    assert "(conversation cleared)" in err
    assert r.stdout.count("\n") >= 3  # three answered turns


def test_chat_without_mmproj_refuses_images_but_keeps_going(pair):
    text, _, img = pair
    r = kimivl("chat", "-m", str(text), "--max-tokens", "2", stdin=f"/image {img}\nhi\nhello\n")
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
    r = kimivl(*args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
