"""The CLI where people and shells push it: numeric options checked at argument time, readers that go away
(``| head``), and progress reporting (the hooks, and silence when stderr is not a terminal)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared import run_cli

EXIT_SIGPIPE = 141  # what a shell reports for a coreutils tool killed by SIGPIPE: 128 + 13


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, converted) -> tuple[Path, Path]:
    return converted(tiny_checkpoint("instruct", seed=3), "f32", "f16")


# -- numeric options ------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("--temp", "nan"), ("--temp", "inf"), ("--temp", "-1"), ("--temp", "warm"),
    ("--top-p", "2"), ("--top-p", "0"), ("--top-p", "nan"),
    ("--top-k", "-1"), ("--top-k", "1.5"),
    ("--min-p", "1.5"), ("--min-p", "-0.1"),
    ("--repeat-penalty", "0"), ("--repeat-penalty", "nan"), ("--repeat-penalty", "-inf"),
    ("--seed", "-1"), ("--seed", str(2**32)),
    ("--ctx", "-5"), ("--ctx", "8"), ("--ctx", "200000"),
    ("--threads", "0"), ("--threads", "513"),
    ("--max-tokens", "0"), ("--max-tokens", "-3"),
    ("--max-image-patches", "1"),
]


@pytest.mark.parametrize("verb", ["run", "chat"])
@pytest.mark.parametrize("option,value", BAD_VALUES)
def test_numeric_options_are_checked_at_argument_time(cli, verb, option, value):
    # the model file does not exist: an argument-time check answers before anything is loaded
    args = [verb, "-m", "missing.gguf", f"{option}={value}"] + (["-p", "x"] if verb == "run" else [])
    r = cli(*args, stdin="")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"kimivl-edge {verb}: error: argument {option}:") and value in lines[0], r.stderr


def test_boundary_values_are_accepted(cli, pair):
    text, _ = pair
    r = cli("run", "-m", str(text), "-p", "Hi", "--temp", "0", "--top-p", "1", "--top-k", "0", "--min-p", "1",
            "--repeat-penalty", "0.5", "--seed", str(2**32 - 1), "--ctx", "64", "--threads", "1",
            "--max-tokens", "1", "--max-image-patches", "4")
    assert r.returncode == 0, r.stderr


# -- broken pipes ---------------------------------------------------------------------------------------------

def _cli_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """The CLI writing into a pipe whose reader has already gone (``... | true``): every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "kimivl_edge", *args], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, timeout=300)
    finally:
        os.close(write_end)


def _cli_into_head(*args: str) -> tuple[int, str, bytes]:
    """``kimivl-edge ARGS | head -1``: read one line, close the pipe, let the CLI finish."""
    p = subprocess.Popen([sys.executable, "-m", "kimivl_edge", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    return p.wait(timeout=300), err, first


def _quiet(err: str) -> bool:
    return "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err


def test_run_into_a_closed_pipe_exits_quietly(pair):
    text, _ = pair
    r = _cli_into_closed_pipe("run", "-m", str(text), "-p", "Hi", "--max-tokens", "8")
    assert r.returncode == EXIT_SIGPIPE and _quiet(r.stderr), r.stderr


def test_convert_dry_run_into_a_closed_pipe_exits_quietly(tiny_checkpoint):
    r = _cli_into_closed_pipe("convert", str(tiny_checkpoint("instruct", seed=3)), "--dry-run")
    assert r.returncode == EXIT_SIGPIPE and _quiet(r.stderr), r.stderr


def test_chat_into_a_closed_pipe_exits_quietly(pair):
    text, _ = pair
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "kimivl_edge", "chat", "-m", str(text), "--max-tokens", "4"],
                           input="Hi\nHello\n", stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert r.returncode == EXIT_SIGPIPE and _quiet(r.stderr), r.stderr


def test_head_of_run_and_convert_dry_run(pair, tiny_checkpoint):
    # A reader that leaves after one line: the CLI ends quietly, with 141 if it wrote after the reader left, or 0
    # if everything was already in the pipe's buffer when it did.
    text, _ = pair
    ckpt = tiny_checkpoint("instruct", seed=3)
    for args in (["run", "-m", str(text), "-p", "Hi", "--temp", "1", "--max-tokens", "64"],
                 ["convert", str(ckpt), "--dry-run"]):
        rc, err, first = _cli_into_head(*args)
        assert rc in (0, EXIT_SIGPIPE) and _quiet(err), err
    assert first  # the dry-run's first line came through


def test_help_into_a_closed_pipe_exits_quietly():
    r = _cli_into_closed_pipe("run", "--help")  # argparse swallows the write error itself: 0 or 141
    assert r.returncode in (0, EXIT_SIGPIPE) and _quiet(r.stderr), r.stderr


# -- progress -------------------------------------------------------------------------------------------------

def _check_counts(calls: list[tuple[int, int, str]], total: int, unit: str) -> None:
    """Monotonic counts of one ``total``, ending at it."""
    assert calls and all(t == total and u == unit for _, t, u in calls), calls
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == total and done[0] >= 0, calls


def test_load_progress_reaches_100_percent(pair):
    from kimivl_edge.decoder import Decoder, DecoderSettings

    calls: list[tuple[int, int, str]] = []
    dec = Decoder(pair[0], DecoderSettings(n_ctx=64, n_threads=1), progress=lambda *a: calls.append(a))
    dec.close()
    _check_counts(calls, 100, "%")
    assert len({d for d, _, _ in calls}) == len(calls)  # one call per new percent


def test_an_exception_in_load_progress_cancels_the_load(pair):
    from kimivl_edge.decoder import Decoder, DecoderSettings

    def stop(done, total, unit):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Decoder(pair[0], DecoderSettings(n_ctx=64, n_threads=1), progress=stop)


def test_prefill_progress_counts_chunks_of_the_evaluated_positions(pair):
    from kimivl_edge.decoder import Decoder, DecoderSettings

    dec = Decoder(pair[0], DecoderSettings(n_ctx=256, n_batch=16, n_threads=1, kv_type="f32"))
    try:
        ids = [int(t) for t in np.random.default_rng(0).integers(300, 1000, 50)]
        calls: list[tuple[int, int, str]] = []
        dec.prefill([ids], progress=lambda *a: calls.append(a))
        _check_counts(calls, 50, "token")
        assert [d for d, _, _ in calls] == [16, 32, 48, 50]  # chunks of n_batch
        calls.clear()
        before = dec.n_evaluated
        dec.prefill([ids + [400] * 20], progress=lambda *a: calls.append(a))
        _check_counts(calls, 20, "token")  # the 50 cached positions are not evaluated again
        assert dec.n_evaluated - before == 20
    finally:
        dec.close()


def test_model_prefill_progress_covers_text_and_image_rows(pair, tmp_path):
    from kimivl_edge import KimiVL
    from kimivl_edge.prompt import user_message

    img = tmp_path / "blue.png"
    Image.new("RGB", (120, 80), "blue").save(img)
    calls: list[tuple[int, int, str]] = []
    with KimiVL.load(*pair, n_ctx=512, n_threads=1, n_batch=8) as model:
        model.prefill_progress = lambda *a: calls.append(a)
        out = model.generate([user_message("What colour?", [img])], max_tokens=1)
    _check_counts(calls, out.stats.evaluated_tokens, "token")
    assert out.stats.image_tokens == 15 and calls[-1][0] > 15  # the image rows and the text around them


def test_no_progress_when_stderr_is_not_a_terminal(pair, tmp_path):
    text, mm = pair
    img = tmp_path / "green.png"
    Image.new("RGB", (120, 80), "green").save(img)
    long_prompt = "Describe the picture in every detail. " * 60  # several hundred tokens: a prefill with progress
    r = run_cli("run", "-m", str(text), "--mmproj", str(mm), "--image", str(img), "-p", long_prompt,
                "--max-tokens", "2", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "loading" not in r.stderr and "encoding" not in r.stderr, r.stderr
    assert "reading the prompt" not in r.stderr, r.stderr


def test_an_image_budget_larger_than_half_the_context_is_said_at_load():
    """Issue 14 defect 7: Thinking-2506's 16384 patches (4096 tokens) do not fit the default --ctx 4096; the load
    says so in one line with the knobs, and says nothing when the budget fits (the bundled model: 4096 patches)."""
    from kimivl_edge.cli_common import image_budget_note
    from kimivl_edge.image import ImageProcessorConfig

    class Fake:  # only what the note reads: the processor's budget, the user's cap, the context
        def __init__(self, limit: int, cap: int | None, n_ctx: int):
            self.image_config = ImageProcessorConfig(patch_size=14, merge_kernel_size=(2, 2), in_token_limit=limit,
                                                     image_mean=(0.5,) * 3, image_std=(0.5,) * 3, pad_input=True)
            self.max_image_patches, self.decoder = cap, type("D", (), {"n_ctx": n_ctx})()

    note = image_budget_note(Fake(16384, None, 4096))  # type: ignore[arg-type]
    assert note is not None and "4096 image tokens (16384 patches)" in note
    assert "--max-image-patches 8192" in note and "--ctx" in note
    assert image_budget_note(Fake(16384, 8192, 4096)) is None  # type: ignore[arg-type]
    assert image_budget_note(Fake(4096, None, 4096)) is None  # type: ignore[arg-type]
    assert image_budget_note(Fake(4096, None, 2048)) is None  # type: ignore[arg-type]  # 1024 tokens: half
    assert image_budget_note(Fake(4096, None, 1024)) is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["thinking-2506", "instruct"])
def test_run_says_the_image_budget_note_at_the_default_ctx(cli, tiny_checkpoint, converted, variant):
    """The note above, in ``run``'s own output: a Thinking-2506 model at the default --ctx (4096) gets one ``note:``
    line on stderr and still answers; an Instruct model (4096 patches = 1024 tokens, a quarter) gets none. The
    budget comes from the checkpoint's own preprocessor_config.json."""
    ckpt = tiny_checkpoint(variant)
    limit = json.loads((ckpt / "preprocessor_config.json").read_text())["in_token_limit"]
    text, mmproj = converted(ckpt, "f32", "f16")
    r = cli("run", "-m", str(text), "--mmproj", str(mmproj), "-p", "Hi", "--max-tokens", "1", "--threads", "1",
            "--no-cache")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    if limit // 4 > 4096 // 2:
        assert len(notes) == 1, r.stderr
        assert f"{limit // 4} image tokens ({limit} patches) of the 4096-token context" in notes[0], notes
        assert "--ctx" in notes[0] and "--max-image-patches 8192" in notes[0], notes
    else:
        assert notes == [], r.stderr
    assert variant != "thinking-2506" or notes, "the Thinking-2506 checkpoint must exceed half the context"


@pytest.mark.parametrize("extra", [[], ["--flash-attn"]])
def test_a_quantized_kv_cache_is_refused_in_one_line(cli, pair, extra):
    """Issue 14 defect 11: ``--kv-type q8_0`` on the tiny model (cached K head 272 = kv_lora_rank 256 + RoPE 16, not
    a multiple of 32; without flash attention llama.cpp keeps no quantized V cache at all) is one line on stderr
    and exit 2, before anything is generated."""
    r = cli("run", "-m", str(pair[0]), "-p", "Hi", "--kv-type", "q8_0", "--max-tokens", "1", "--threads", "1", *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("kimivl-edge run: error: ") and "q8_0" in lines[0], lines
    reason = ("key_length 272", "multiples of 32") if extra else ("flash",)
    assert all(w in lines[0] for w in reason), lines
    assert r.stdout == "", r.stdout


def test_no_exif_reaches_the_loader(monkeypatch):
    """--no-exif turns off the EXIF orientation the API applies by default (KimiVL.load's exif_transpose)."""
    import argparse

    from kimivl_edge import cli_common
    from kimivl_edge.model import KimiVL

    seen: list[dict] = []

    class Stop(Exception):
        pass

    def fake_load(*a, **kw):
        seen.append(kw)
        raise Stop

    monkeypatch.setattr(KimiVL, "load", staticmethod(fake_load))
    for argv, want in ((["-m", "x.gguf"], True), (["-m", "x.gguf", "--no-exif"], False)):
        ap = argparse.ArgumentParser()
        cli_common.add_model_args(ap)
        with pytest.raises(Stop):
            cli_common.load_model(ap.parse_args(argv))
        assert seen[-1]["exif_transpose"] is want
