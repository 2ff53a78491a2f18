"""`kimivl-edge run` and `kimivl-edge chat` as a user drives them: stdout/stderr, commands, history, exit codes."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from shared import run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_checkpoint, converted) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    text, mm = converted(tiny_checkpoint("thinking", seed=4), "q8_0", "f16")
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
    assert "commands: /image PATH, /clear, /quit" in err
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
