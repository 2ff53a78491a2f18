"""Sections 9-11 of `kimivl-edge bench`: cold start against llama.cpp's own ``llama-mtmd-cli``, our decoder's load
modes, and vision encode against the time ``llama-mtmd-cli`` reports. Alone, on a given GGUF pair:

    python -m kimivl_edge.bench.coldstart [--model TEXT.gguf --mmproj MMPROJ.gguf] [--threads 1] [--runs 3] [--out DIR]

Without --model the bundled tiny checkpoint is converted (Q4_K_M text, Q8_0 mmproj, as the bench uses) under
--out. Prints the sections' tables and writes DIR/coldstart.json. ``llama-mtmd-cli`` is built once into the user's
cache by ``llama_tools`` (about 15 minutes on 2 cores the first time).

9. Cold start: process start to the first token of ``kimivl-edge run`` (a 448x448 image and a short question,
   greedy, prefix cache off) and of ``llama-mtmd-cli`` on the same pair, same threads and context, with a warm page
   cache (both files read whole before the run) and with them dropped from it (``pagecache.evict``, checked with
   ``mincore``). The first token is,
   for both, the first byte the process writes to stdout after its fixed preamble (``mtmd.PREAMBLE``; ours: none),
   read unbuffered through a pipe.
10. Load modes: ``Decoder`` with mmap on/off x repack on/off: load seconds, peak RSS, prefill and decode tokens/s.
11. Vision: the numpy encoder and our binding of llama.cpp's clip graph (as the runtime uses it, without flash
    attention, and with it), each in a new process after a small warm-up encode, against ``llama-mtmd-cli``'s own
    "mtmd batch encoding done in N ms", 448x448 and 896x896.
Every figure is the median (min-max) of ``runs`` runs; within a run the contenders alternate, their order swapped
every other run.
"""
from __future__ import annotations

import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from ..errors import KimiVLError
from . import llama_tools, mtmd
from .harness import Children, FirstByte, log_tail, pair_or_bundled, run_first_byte, run_measured
from .pagecache import evict, resident_fraction
from .probes import raw_read_seconds
from .sections import DECODE_TOKENS, PROMPT_TOKENS, mode_name, say, summarize

COLD_IMAGE = (448, 448)
COLD_QUESTION = "What is in the picture?"
COLD_TOKENS = 4     # tokens each cold-start run generates (-n / --max-tokens); the first one is timed
COLD_CTX = 4096     # `kimivl-edge run`'s default --ctx, given to llama-mtmd-cli as -c
TOOLS = ("kimivl_edge", "llama_mtmd_cli")
CACHES = ("warm", "cold")
LOAD_MODES = ((True, True), (True, False), (False, True), (False, False))   # (mmap, repack)
MODE_CTX = 1024
MTMD_SIZES = ((448, 448), (896, 896))
WARMUP_IMAGE = (56, 56)
VISION_SIDES = ("numpy", "ggml", "ggml-flash", "llama_mtmd_cli")
RSS_SLACK, DECODE_SLACK = 1.10, 0.95   # "within" the lowest peak RSS / the best decode speed, for the default


T = TypeVar("T")


def _order(items: Sequence[T], run: int) -> Sequence[T]:
    """The contenders in ``run``'s order: as given on even runs, reversed on odd ones."""
    return items if run % 2 == 0 else items[::-1]


def _image(workdir: Path, size: tuple[int, int], seed: int) -> Path:
    from .tasks import _noise_image

    path = workdir / f"noise-{size[0]}x{size[1]}.png"
    if not path.is_file():
        _noise_image(size, seed).save(path)
    return path


def mtmd_tool() -> Path:
    """llama-mtmd-cli, built first if needed (``llama_tools``); a one-line error if it cannot be."""
    try:
        llama_tools.build()
    except llama_tools.ToolsError as e:
        raise KimiVLError(f"{mtmd.TOOL} could not be built: {e}") from e
    return llama_tools.tool(mtmd.TOOL)


# ---------------------------------------------------------------------------------------------------------------
# section 9: cold start

def _commands(ch: Children, text: Path, mmproj: Path, image: Path, repack: bool) -> dict[str, tuple[list[str], int]]:
    """Each contender's command line and the stdout bytes it writes before its first token."""
    ours = [sys.executable, "-m", "kimivl_edge", "run", "-m", str(text), "--mmproj", str(mmproj), "--image",
            str(image), "-p", COLD_QUESTION, "--temp", "0", "--max-tokens", str(COLD_TOKENS), "--threads",
            str(ch.threads), "--ctx", str(COLD_CTX), "--no-cache"]
    theirs = mtmd.command(mtmd_tool(), text, mmproj, image, COLD_QUESTION, ch.threads, COLD_TOKENS, COLD_CTX, repack)
    return {"kimivl_edge": (ours, 0), "llama_mtmd_cli": (theirs, len(mtmd.PREAMBLE))}


LOST_OUTPUT_RETRIES = 2  # llama-mtmd-cli prints from its log's worker thread, which can lose it when it exits


def _first_token(ch: Children, cmd: list[str], skip: int, name: str) -> FirstByte:
    fb = run_first_byte(cmd, ch.log, ch.env, skip)
    for _ in range(LOST_OUTPUT_RETRIES):  # a clean exit with no stdout at all: output lost, not an answer; again
        if fb.returncode != 0 or fb.stdout:
            break
        fb = run_first_byte(cmd, ch.log, ch.env, skip)
    if fb.returncode != 0 or fb.first_byte_seconds is None:
        raise KimiVLError(f"cold start, {name}: exit code {fb.returncode}, {len(fb.stdout)} stdout bytes: "
                          f"{log_tail(ch.log, '(no output)')} (log: {ch.log})")
    if name == "llama_mtmd_cli" and not fb.stdout.startswith(mtmd.PREAMBLE):
        raise KimiVLError(f"{mtmd.TOOL}'s stdout does not start with {mtmd.PREAMBLE!r}: {fb.stdout[:80]!r}")
    return fb


def _cold_row(runs: list[FirstByte]) -> dict:
    return {"first_token_seconds": summarize([x.first_byte_seconds or 0.0 for x in runs]),
            "exit_seconds": summarize([x.seconds for x in runs]),
            "peak_rss_bytes": summarize([x.peak_rss_bytes for x in runs]),
            "stdout": runs[-1].stdout.decode("utf-8", "replace")}


def coldstart_section(ch: Children, text: Path, mmproj: Path, runs: int, system: dict) -> dict:
    """Section 9: one warm-up run each (discarded), then per run: warm, then cold, each contender in turn."""
    files = [text, mmproj]
    cmds = _commands(ch, text, mmproj, _image(ch.workdir, COLD_IMAGE, 7), system["extra_buffers_safe"])
    for name in TOOLS:
        say(f"cold start, warm-up run of {name}")
        _first_token(ch, *cmds[name], name)
    runs_by: dict[str, list[FirstByte]] = {f"{n}/{c}": [] for n in TOOLS for c in CACHES}
    resident: dict[str, list[float]] = {c: [] for c in CACHES}
    for r in range(runs):
        for cache in CACHES:
            for name in _order(TOOLS, r):
                say(f"cold start, {name}, {cache} page cache, run {r + 1}/{runs}")
                if cache == "warm":
                    raw_read_seconds(files)  # every page, not only those the last run touched (mmap, experts)
                resident[cache].append(evict(files) if cache == "cold" else resident_fraction(files))
                runs_by[f"{name}/{cache}"].append(_first_token(ch, *cmds[name], name))
    rows = {k: _cold_row(v) for k, v in runs_by.items()}
    ratio = {c: rows[f"kimivl_edge/{c}"]["first_token_seconds"]["median"]
             / rows[f"llama_mtmd_cli/{c}"]["first_token_seconds"]["median"] for c in CACHES}
    return {"image": f"{COLD_IMAGE[0]}x{COLD_IMAGE[1]}", "question": COLD_QUESTION, "tokens": COLD_TOKENS,
            "n_ctx": COLD_CTX, "files_bytes": sum(f.stat().st_size for f in files),
            "commands": {n: shlex.join(c) for n, (c, _) in cmds.items()}, "rows": rows,
            "ours_over_mtmd": ratio, "resident_before_cold_max": max(resident["cold"]),
            "resident_before_warm_min": min(resident["warm"])}


# ---------------------------------------------------------------------------------------------------------------
# section 10: load modes

def _mode_row(data: list[dict], rss: list[int], decode_tokens: int) -> dict:
    if not data[0]["available"]:
        return {"available": False, "reason": data[0]["reason"]}
    return {"available": True, "load_seconds": summarize([d["load_seconds"] for d in data]),
            "peak_rss_bytes": summarize(rss),
            "prefill_tokens_per_s": summarize([PROMPT_TOKENS / s for d in data for s in d["prefill_seconds"]]),
            "decode_tokens_per_s": summarize([decode_tokens / s for d in data for s in d["decode_seconds"]])}


def favoured_mode(rows: dict[str, dict]) -> str | None:
    """The mode the figures favour: memory first, then decode speed, then load time. Of the available modes whose
    peak RSS is within ``RSS_SLACK`` of the lowest, those whose decode is within ``DECODE_SLACK`` of the fastest of
    them; of these, the fastest to load."""
    ok = {k: v for k, v in rows.items() if v["available"]}
    if not ok:
        return None

    def med(k: str, fig: str) -> float:
        return ok[k][fig]["median"]

    low_rss = min(med(k, "peak_rss_bytes") for k in ok)
    lean = [k for k in ok if med(k, "peak_rss_bytes") <= RSS_SLACK * low_rss]
    best = max(med(k, "decode_tokens_per_s") for k in lean)
    fast = [k for k in lean if med(k, "decode_tokens_per_s") >= DECODE_SLACK * best]
    return min(fast, key=lambda k: med(k, "load_seconds"))


def load_modes_section(ch: Children, text: Path, runs: int, decode_tokens: int, system: dict) -> dict:
    """Section 10: a child per (mode, run), modes alternating; each loads, prefills and decodes once."""
    base = {"kind": "load_mode", "gguf": str(text), "n_ctx": MODE_CTX, "n_batch": PROMPT_TOKENS,
            "threads": ch.threads, "prompt_tokens": PROMPT_TOKENS, "decode_tokens": decode_tokens, "runs": 1}
    data: dict[str, list[dict]] = {mode_name(*m): [] for m in LOAD_MODES}
    rss: dict[str, list[int]] = {k: [] for k in data}
    for r in range(runs):
        for mm, rp in _order(LOAD_MODES, r):
            name = mode_name(mm, rp)
            if data[name] and not data[name][0]["available"]:
                continue
            say(f"load mode {name}, {text.name}, run {r + 1}/{runs}")
            d, m = ch.run(dict(base, mmap=mm, repack=rp))
            data[name].append(d)
            rss[name].append(m.peak_rss_bytes)
    rows = {k: _mode_row(v, rss[k], decode_tokens) for k, v in data.items()}
    return {"gguf": text.name, "gguf_bytes": text.stat().st_size, "n_ctx": MODE_CTX, "prompt_tokens": PROMPT_TOKENS,
            "decode_tokens": decode_tokens, "rows": rows, "favoured": favoured_mode(rows),
            "default": mode_name(system["auto_mmap"], system["auto_repack"])}


# ---------------------------------------------------------------------------------------------------------------
# section 11: vision against llama-mtmd-cli

def _ours_encode(ch: Children, mmproj: Path, backend: str, size: tuple[int, int]) -> float:
    data, _ = ch.run({"kind": "vision", "mmproj": str(mmproj), "backend": backend, "sizes": [WARMUP_IMAGE, size],
                      "runs": 1, "threads": ch.threads})
    if not data["available"]:
        raise KimiVLError(f"vision {backend} on {mmproj.name}: {data['error']}")
    return data["items"][-1]["seconds"][0]


def _mtmd_encode(ch: Children, cmd: list[str]) -> tuple[float, bool | None]:
    """Seconds of the tool's own image-batch encode and whether its vision graph used flash attention."""
    log = ch.workdir / "mtmd-vision.log"
    log.unlink(missing_ok=True)
    m = run_measured(cmd, log, ch.env)
    text = log.read_text(errors="replace")
    with open(ch.log, "a") as fh:
        fh.write(text)
    if m.returncode != 0:
        raise KimiVLError(f"{mtmd.TOOL} exited with code {m.returncode}: {log_tail(log, '(no output)')}")
    return sum(mtmd.encode_ms(text)) / 1000, mtmd.flash_attention(text)


def vision_mtmd_section(ch: Children, text: Path, mmproj: Path, runs: int, system: dict,
                        sizes: Sequence[tuple[int, int]] = MTMD_SIZES) -> dict:
    """Section 11: per run and size the numpy encoder, our clip binding and llama-mtmd-cli, alternating."""
    tool = mtmd_tool()
    secs: dict[str, dict[str, list[float]]] = {f"{w}x{h}": {s: [] for s in VISION_SIDES} for w, h in sizes}
    flash: bool | None = None
    for r in range(runs):
        for size in sizes:
            key = f"{size[0]}x{size[1]}"
            cmd = mtmd.command(tool, text, mmproj, _image(ch.workdir, size, 11), COLD_QUESTION, ch.threads, 1,
                               COLD_CTX, system["extra_buffers_safe"], library_log=True)
            for side in _order(VISION_SIDES, r):
                say(f"vision {key}, {side}, run {r + 1}/{runs}")
                if side == "llama_mtmd_cli":
                    s, flash = _mtmd_encode(ch, cmd)
                else:
                    s = _ours_encode(ch, mmproj, side, size)
                secs[key][side].append(s)
    rows = {k: {s: summarize(v) for s, v in by.items()} for k, by in secs.items()}
    ratio = {k: {s: statistics.median(by[s]) / statistics.median(by["llama_mtmd_cli"]) for s in VISION_SIDES[:-1]}
             for k, by in secs.items()}
    return {"mmproj": mmproj.name, "rows": rows, "over_mtmd": ratio, "mtmd_flash_attention": flash}


# ---------------------------------------------------------------------------------------------------------------
# all three, and bench.md

def coldstart_sections(ch: Children, text: Path, mmproj: Path, runs: int, decode_tokens: int) -> dict:
    """Sections 9-11 into one dictionary (bench.json's ``coldstart``)."""
    say("llama.cpp's system info")
    system, _ = ch.run({"kind": "system_info", "gguf": str(text)})
    return {"system_info": system["system_info"], "extra_buffers_safe": system["extra_buffers_safe"],
            "cold_start": coldstart_section(ch, text, mmproj, runs, system),
            "load_modes": load_modes_section(ch, text, runs, decode_tokens, system),
            "vision_mtmd": vision_mtmd_section(ch, text, mmproj, runs, system)}


def main(argv: list[str] | None = None) -> int:
    from ..cli import OneLineParser

    ap = OneLineParser(prog="python -m kimivl_edge.bench.coldstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    ap.add_argument("--out", default="build/bench-coldstart")
    args = ap.parse_args(argv)
    if (args.model is None) != (args.mmproj is None):
        ap.error("give both --model and --mmproj, or neither")
    for f in (args.model, args.mmproj):
        if f is not None and not Path(f).is_file():
            ap.error(f"{f}: no such file")
    if args.threads < 1 or args.runs < 1 or args.decode_tokens < 1:
        ap.error("--threads, --runs and --decode-tokens must be >= 1")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    text, mm = pair_or_bundled(args.model, args.mmproj, root)
    from .report import coldstart_markdown

    r = {"threads": args.threads,
         "coldstart": coldstart_sections(Children(root, args.threads), text, mm, args.runs, args.decode_tokens)}
    (root / "coldstart.json").write_text(json.dumps(r, indent=2) + "\n")
    print("\n".join(coldstart_markdown(r)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
