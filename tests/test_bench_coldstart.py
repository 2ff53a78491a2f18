"""`kimivl-edge bench` sections 9-11 (cold start and vision against llama.cpp's own llama-mtmd-cli, load modes):
eviction from the page cache checked by util-linux's fincore, llama-mtmd-cli's output and log parsed from a real
run of the tool on the bundled tiny model, the first-byte timer, the sections run for real (one thread, one run)
and their tables, and the load-average wording. No absolute time is asserted."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kimivl_edge.bench import llama_tools, mtmd
from kimivl_edge.bench.coldstart import coldstart_sections, favoured_mode
from kimivl_edge.bench.sections import mode_name
from kimivl_edge.bench.harness import Children, run_first_byte
from kimivl_edge.bench.pagecache import evict, resident_fraction, resident_pages
from kimivl_edge.bench.report import coldstart_markdown, load_sentence
from kimivl_edge.errors import KimiVLError

ASSET = Path(__file__).resolve().parents[1] / "kimivl_edge" / "assets" / "kimi-vl-tiny"
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="session")
def mtmd_cli() -> Path:
    """llama.cpp's llama-mtmd-cli, built once into the user's cache (returns at once when it is there)."""
    llama_tools.build()
    return llama_tools.tool(mtmd.TOOL)


@pytest.fixture(scope="session")
def tiny_pair(converted) -> tuple[Path, Path]:
    return converted(ASSET, "q4_k_m", "q8_0")


@pytest.fixture(scope="session")
def mtmd_run(mtmd_cli, tiny_pair, tmp_path_factory) -> subprocess.CompletedProcess:
    """One real llama-mtmd-cli turn on the tiny pair, as the bench runs it (stdout and stderr kept apart)."""
    from PIL import Image

    img = tmp_path_factory.mktemp("mtmd") / "red.png"
    Image.new("RGB", (448, 448), (220, 30, 30)).save(img)
    cmd = mtmd.command(mtmd_cli, *tiny_pair, img, "What colour is the shape?", threads=1, n_predict=4, n_ctx=1024,
                       repack=False, library_log=True)
    return subprocess.run(cmd, capture_output=True, timeout=300)


def _fincore_bytes(path: Path) -> int:
    """Resident bytes of ``path`` by util-linux's fincore (an oracle independent of our mincore call)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


# ---------------------------------------------------------------------------------------------------------------
# the page cache

def test_evict_drops_the_file_and_mincore_agrees_with_fincore(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(64 * PAGE + 123))   # a partial last page
    f.read_bytes()
    pages = 65
    assert _fincore_bytes(f) == pages * PAGE
    assert resident_pages(f) == (pages, pages)
    assert resident_fraction([f]) == 1.0
    left = evict([f])
    assert _fincore_bytes(f) == 0
    assert left == 0.0 and resident_pages(f) == (0, pages)
    with open(f, "rb") as fh:   # read back the first 16 pages only
        fh.read(16 * PAGE)
    assert _fincore_bytes(f) >= 16 * PAGE   # readahead may bring more
    assert resident_pages(f)[0] * PAGE == _fincore_bytes(f)


def test_resident_fraction_weighs_files_by_pages(tmp_path):
    a, b, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    a.write_bytes(b"x" * (3 * PAGE))
    b.write_bytes(b"y" * PAGE)
    empty.write_bytes(b"")
    evict([a, b, empty])
    b.read_bytes()
    assert resident_fraction([a, b, empty]) == pytest.approx(1 / 4)
    assert resident_fraction([empty]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# llama-mtmd-cli, for real

def test_mtmd_cli_output_and_log_parse(mtmd_run):
    log = mtmd_run.stderr.decode("utf-8", "replace")
    assert mtmd_run.returncode == 0, log[-2000:]
    # what the bench relies on: one newline once the prompt is evaluated, then the answer's pieces
    assert mtmd_run.stdout.startswith(mtmd.PREAMBLE) and len(mtmd_run.stdout) > len(mtmd.PREAMBLE)
    ms = mtmd.encode_ms(log)
    assert len(ms) == 1 and ms[0] >= 0   # one image, one batch
    assert f"mtmd batch encoding done in {ms[0]} ms" in log
    assert mtmd.flash_attention(log) in (True, False)


def test_mtmd_log_without_the_encode_line_is_a_clear_error():
    with pytest.raises(KimiVLError, match="logged no 'mtmd batch encoding done in N ms' line.*last words"):
        mtmd.encode_ms("load_model: ok\nlast words\n")
    with pytest.raises(KimiVLError, match=r"\(empty\)"):
        mtmd.encode_ms("")
    assert mtmd.encode_ms("mtmd batch encoding done in 12 ms\nmtmd batch encoding done in 3 ms\n") == [12, 3]
    assert mtmd.flash_attention("warmup: flash attention is disabled\n") is False
    assert mtmd.flash_attention("nothing") is None


# ---------------------------------------------------------------------------------------------------------------
# the first-byte timer

def test_run_first_byte_skips_the_preamble(tmp_path):
    code = "import sys, os; os.write(1, b'\\n'); os.write(1, b'answer'); sys.exit(3)"
    fb = run_first_byte([sys.executable, "-c", code], tmp_path / "log", skip=1)
    assert fb.returncode == 3 and fb.stdout == b"\nanswer"
    assert fb.first_byte_seconds is not None and 0 < fb.first_byte_seconds <= fb.seconds
    assert fb.peak_rss_bytes > 0
    none = run_first_byte([sys.executable, "-c", code], tmp_path / "log", skip=len(b"\nanswer"))
    assert none.first_byte_seconds is None


# ---------------------------------------------------------------------------------------------------------------
# the sections, for real on the tiny pair

def test_coldstart_sections_smoke(mtmd_cli, tiny_pair, tmp_path):
    text, mmproj = tiny_pair
    c = coldstart_sections(Children(tmp_path, 1), text, mmproj, runs=1, decode_tokens=8)
    cs = c["cold_start"]
    assert set(cs["rows"]) == {f"{t}/{k}" for t in ("kimivl_edge", "llama_mtmd_cli") for k in ("warm", "cold")}
    for row in cs["rows"].values():
        ft, ex = row["first_token_seconds"]["median"], row["exit_seconds"]["median"]
        assert 0 < ft <= ex and math.isfinite(ex)
        assert row["stdout"].strip()
    assert cs["resident_before_cold_max"] < 0.05 and cs["resident_before_warm_min"] > 0.99
    assert "--no-cache" in cs["commands"]["kimivl_edge"] and "--temp 0" in cs["commands"]["llama_mtmd_cli"]
    lm = c["load_modes"]
    assert set(lm["rows"]) == {mode_name(m, r) for m in (True, False) for r in (True, False)}
    amx = "AMX_INT8 = 1" in c["system_info"]
    for (m, r) in ((True, True), (False, True)):
        assert lm["rows"][mode_name(m, r)]["available"] is not amx
    assert lm["default"] == mode_name(True, False) if amx else lm["default"] in lm["rows"]
    vm = c["vision_mtmd"]
    assert set(vm["rows"]) == {"448x448", "896x896"}
    for by in vm["rows"].values():
        assert set(by) == {"numpy", "ggml", "ggml-flash", "llama_mtmd_cli"}
        assert all(v["median"] >= 0 for v in by.values())
    assert vm["mtmd_flash_attention"] in (True, False)   # the tool's library log reached us (-lv 4)
    md = "\n".join(coldstart_markdown({"threads": 1, "coldstart": c}))
    for head in ("## 9. Cold start against llama-mtmd-cli", "## 10. Load modes", "## 11. Vision encode against"):
        assert head in md


# ---------------------------------------------------------------------------------------------------------------
# rendering and wording, from hand-made figures

def _stat(v: float) -> dict:
    return {"median": v, "min": v, "max": v, "values": [v]}


def _mode(load: float, rss: float, dec: float) -> dict:
    return {"available": True, "load_seconds": _stat(load), "peak_rss_bytes": _stat(rss),
            "prefill_tokens_per_s": _stat(100.0), "decode_tokens_per_s": _stat(dec)}


HAND = {"threads": 2, "coldstart": {
    "system_info": "CPU : AVX2 = 1 |", "extra_buffers_safe": True,
    "cold_start": {"image": "448x448", "question": "Q?", "tokens": 4, "n_ctx": 4096, "files_bytes": 2e9,
                   "commands": {"kimivl_edge": "python -m kimivl_edge run ...", "llama_mtmd_cli": "llama-mtmd-cli ..."},
                   "rows": {"kimivl_edge/warm": {"first_token_seconds": _stat(3.0), "exit_seconds": _stat(4.0),
                                                 "peak_rss_bytes": _stat(1.5e9), "stdout": "a"},
                            "llama_mtmd_cli/warm": {"first_token_seconds": _stat(4.0), "exit_seconds": _stat(5.0),
                                                    "peak_rss_bytes": _stat(2.5e9), "stdout": "\nb"},
                            "kimivl_edge/cold": {"first_token_seconds": _stat(9.0), "exit_seconds": _stat(10.0),
                                                 "peak_rss_bytes": _stat(1.5e9), "stdout": "a"},
                            "llama_mtmd_cli/cold": {"first_token_seconds": _stat(12.0), "exit_seconds": _stat(13.0),
                                                    "peak_rss_bytes": _stat(2.5e9), "stdout": "\nb"}},
                   "ours_over_mtmd": {"warm": 0.75, "cold": 0.75}, "resident_before_cold_max": 0.001,
                   "resident_before_warm_min": 1.0},
    "load_modes": {"gguf": "t.gguf", "gguf_bytes": 1e9, "n_ctx": 1024, "prompt_tokens": 512, "decode_tokens": 64,
                   "rows": {"mmap on, repack on": _mode(2.0, 3.0e9, 10.0),
                            "mmap on, repack off": _mode(1.0, 2.0e9, 9.9),
                            "mmap off, repack on": {"available": False, "reason": "not available on this CPU: why"},
                            "mmap off, repack off": _mode(5.0, 2.0e9, 9.0)},
                   "favoured": "mmap on, repack off", "default": "mmap off, repack on"},
    "vision_mtmd": {"mmproj": "m.gguf", "rows": {"448x448": {"numpy": _stat(1.0), "ggml": _stat(2.0),
                                                              "ggml-flash": _stat(3.0), "llama_mtmd_cli": _stat(4.0)}},
                    "over_mtmd": {"448x448": {"numpy": 0.25, "ggml": 0.5, "ggml-flash": 0.75}},
                    "mtmd_flash_attention": True}}}


def test_coldstart_tables_render_the_figures():
    md = "\n".join(coldstart_markdown(HAND))
    assert "| warm | 3.00 | 4.00 | 0.75 | 4.00 | 5.00 | 1.50 / 2.50 |" in md
    assert "| cold | 9.00 | 12.00 | 0.75 | 10.00 | 13.00 | 1.50 / 2.50 |" in md
    assert "at most 0 % of their pages still resident" in md and "at least 100 % resident" in md
    assert "| mmap on, repack off | 1.00 | 2.00 | 100.0 | 9.9 |" in md
    assert "| mmap off, repack on | not available on this CPU (below) | | | |" in md
    assert md.count("not available on this CPU: why") == 1
    assert "favour mmap on, repack off" in md and "is mmap off, repack on: a different mode" in md
    assert "| 448x448 | 1.00 | 2.00 | 3.00 | 4.00 | 0.25 | 0.50 | 0.75 |" in md
    assert "flash attention in its vision graph: on (its log" in md
    assert "    llama-mtmd-cli ..." in md


def test_favoured_mode_by_hand():
    rows = HAND["coldstart"]["load_modes"]["rows"]
    # repack on decodes fastest but holds 1.5x the memory: out; of the rest, mmap on loads fastest
    assert favoured_mode(rows) == "mmap on, repack off"
    slow = dict(rows, **{"mmap on, repack off": _mode(1.0, 2.0e9, 5.0)})   # too slow a decode: out
    assert favoured_mode(slow) == "mmap off, repack off"
    assert favoured_mode({"x": {"available": False, "reason": "r"}}) is None


def test_load_sentence_words_the_figure():
    assert load_sentence([0.17, 0.5, 0.9], 2) == "0.17 (below 0.3: the machine was idle)"
    busy = load_sentence([2.23, 2.0, 1.8], 2)
    assert busy.startswith("2.23 (") and "2.2 runnable for 2 CPUs" in busy and "idle" not in busy
    assert load_sentence(None, 2) == "not available on this system"


def test_coldstart_module_refuses_bad_options_in_one_line(tmp_path):
    for args in (["--model", str(tmp_path / "missing.gguf"), "--mmproj", str(tmp_path / "m.gguf")],
                 ["--model", str(tmp_path / "t.gguf")], ["--runs", "0"]):
        p = subprocess.run([sys.executable, "-m", "kimivl_edge.bench.coldstart", *args, "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert p.stderr.startswith("python -m kimivl_edge.bench.coldstart: error: ")


def test_a_tool_that_cannot_be_built_is_a_one_line_error(tmp_path, monkeypatch):
    from kimivl_edge.bench.coldstart import mtmd_tool

    monkeypatch.setenv("KIMIVL_EDGE_LLAMA_TOOLS", str(tmp_path / "tools"))
    monkeypatch.setenv("PATH", str(tmp_path))   # no cmake, no compiler
    with pytest.raises(KimiVLError, match="llama-mtmd-cli could not be built: building llama.cpp's tools needs "
                                          "cmake") as e:
        mtmd_tool()
    assert "\n" not in str(e.value)
