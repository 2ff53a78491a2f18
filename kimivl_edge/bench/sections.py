"""The parent side of bench.md's sections: which child steps each section runs, and how their raw runs become the
figures of bench.json (median, min and max of ``runs`` runs; ratios against the raw read, the raw llama_decode loop,
the roofline ceiling and the GEMM peak)."""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .harness import Children, log_tail, run_measured
from .probes import BANDWIDTH_BYTES, BANDWIDTH_METHOD, GEMM_METHOD, GEMM_N, current_rss, raw_read_seconds
from .roofline import RooflineModel, vision_flops
from .tasks import DECODE_METHODS

TEXT_TYPES = ("q8_0", "q4_k_m", "q4_k_edge")
CONVERT_ORDER = ("q4_k_edge", "q4_k_m", "q8_0")  # smallest file first
MMPROJ_FOR_TEXT = {"q8_0": "q8_0", "q4_k_m": "q4_0", "q4_k_edge": "q8_0"}   # mmproj written by each conversion run
MMPROJ_TYPES = ("f16", "q8_0", "q4_0")
VISION_BACKENDS = ("numpy", "numpy-cached", "ggml")
VISION_SIZES = {"a3b": ((448, 448), (896, 896), (1920, 1080)), "tiny": ((448, 448), (640, 360))}
PROMPT_TOKENS = 512
DECODE_TOKENS = 64
CTX_ROUNDING = 256  # the decode context: prompt + decoded tokens + a margin, rounded up to this
CTX_MARGIN = 8
TTFT_IMAGE = (448, 448)
TTFT_QUESTION = "What is in the picture? Describe the image in detail."
FOLLOWUP_QUESTION = "Which colour is most common in it?"


def summarize(values: Sequence[float]) -> dict:
    """Median, min and max of the runs (and the runs themselves)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("no values to summarize")
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def mode_name(mmap: bool, repack: bool) -> str:
    """A load mode of the text GGUF, as bench.md names it."""
    return f"mmap {'on' if mmap else 'off'}, repack {'on' if repack else 'off'}"


def say(msg: str) -> None:
    """One progress line on stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


# ---------------------------------------------------------------------------------------------------------------
# machine limits

def limits_section(ch: Children, runs: int) -> dict:
    """Read bandwidth and GEMM peak, in one child."""
    say("machine limits: read bandwidth, GEMM peak")
    lim, _ = ch.run({"kind": "limits", "threads": ch.threads, "runs": runs, "bandwidth_bytes": BANDWIDTH_BYTES,
                     "gemm_n": GEMM_N})
    return {"read_bandwidth_bytes_per_s": summarize(lim["bandwidth"]),
            "read_bandwidth_method": BANDWIDTH_METHOD.format(size=f"{BANDWIDTH_BYTES >> 20} MiB", threads=ch.threads),
            "gemm_flops_per_s": summarize(lim["gemm"]), "gemm_method": GEMM_METHOD.format(n=GEMM_N, threads=ch.threads)}


# ---------------------------------------------------------------------------------------------------------------
# section 1: conversion

def raw_read_section(files: Sequence[Path], ckpt_bytes: int, ram: int, runs: int) -> dict:
    """One plain read of the safetensors files per run, and whether the page cache likely served it."""
    say("raw read of the safetensors files")
    reads = [raw_read_seconds(files) for _ in range(runs)]
    cache = (f"page cache not dropped: the {ckpt_bytes / 1e9:.2f} GB checkpoint was just written and fits in "
             f"RAM ({ram / 1e9:.1f} GB), so these reads (and the conversions') likely come from memory: an "
             "upper bound of the disk" if ckpt_bytes < 0.5 * ram else
             f"page cache not dropped: the {ckpt_bytes / 1e9:.1f} GB checkpoint is larger than half the RAM "
             f"({ram / 1e9:.1f} GB), so most reads come from the disk")
    return {"bytes": ckpt_bytes, "seconds": summarize(reads), "bytes_per_s": summarize([ckpt_bytes / s for s in reads]),
            "page_cache_note": cache}


def _child_runs(ch: Children, task: dict, runs: int, label: str) -> tuple[dict, list[float], list[int]]:
    """``task`` ``runs`` times: the last result, the seconds it reports and each child's peak RSS."""
    secs, rss = [], []
    for r in range(runs):
        say(f"{label}, run {r + 1}/{runs}")
        data, m = ch.run(task)
        secs.append(data["seconds"])
        rss.append(m.peak_rss_bytes)
    return data, secs, rss


def _convert_runs(ch: Children, ckpt: Path, gguf_dir: Path, outtype: str, ckpt_bytes: int, read: dict,
                  runs: int) -> tuple[dict, dict]:
    """One text type (with its mmproj): the section-1 row and the result of the last run (its paths)."""
    mt = MMPROJ_FOR_TEXT[outtype]
    task = {"kind": "convert", "checkpoint": str(ckpt), "outtype": outtype, "mmproj_type": mt,
            "outdir": str(gguf_dir), "threads": ch.threads}
    data, secs, rss = _child_runs(ch, task, runs, f"convert -> {outtype.upper()} text + {mt.upper()} mmproj")
    row = {"text_type": outtype, "mmproj_type": mt, "text_bytes": Path(data["text_path"]).stat().st_size,
           "mmproj_bytes": Path(data["mmproj_path"]).stat().st_size, "seconds": summarize(secs),
           "peak_rss_bytes": summarize(rss), "input_bytes_per_s": summarize([ckpt_bytes / s for s in secs]),
           "fraction_of_raw_read": _ratio(read["seconds"]["median"], statistics.median(secs))}
    return row, data


def conversion_section(ch: Children, ckpt: Path, gguf_dir: Path, read: dict, runs: int,
                       llama_convert: Path | None) -> tuple[dict, dict[str, Path]]:
    """Section 1 after the raw read: the rows, and the GGUF paths (text q8_0 / q4_k_m / q4_k_edge, mmproj f16 /
    q8_0 / q4_0)."""
    ckpt_bytes = read["bytes"]
    rows: dict = {}
    paths: dict[str, Path] = {}
    for outtype in CONVERT_ORDER:
        rows[outtype], data = _convert_runs(ch, ckpt, gguf_dir, outtype, ckpt_bytes, read, runs)
        paths[outtype] = Path(data["text_path"])
        paths["mmproj_" + MMPROJ_FOR_TEXT[outtype]] = Path(data["mmproj_path"])
    task = {"kind": "mmproj", "checkpoint": str(ckpt), "mmproj_type": "f16", "outdir": str(gguf_dir)}
    data, secs, rss = _child_runs(ch, task, runs, "convert -> F16 mmproj only")
    paths["mmproj_f16"] = Path(data["mmproj_path"])
    rows["mmproj_f16"] = {"mmproj_type": "f16", "mmproj_bytes": paths["mmproj_f16"].stat().st_size,
                          "seconds": summarize(secs), "peak_rss_bytes": summarize(rss)}
    rows["llama_convert"] = llama_convert_section(llama_convert, ch, ckpt, gguf_dir, ckpt_bytes, runs)
    return rows, paths


def llama_convert_section(script: Path | None, ch: Children, ckpt: Path, gguf_dir: Path, ckpt_bytes: int,
                          runs: int) -> dict:
    """llama.cpp's own converter on the same checkpoint (only when the user gives its path; never downloaded)."""
    if script is None:
        return {"measured": False, "reason": "no --llama-convert PATH given"}
    out = gguf_dir / "llama-convert-Q8_0.gguf"
    secs, rss = [], []
    for r in range(runs):
        say(f"llama.cpp convert_hf_to_gguf.py -> Q8_0, run {r + 1}/{runs}")
        m = run_measured([sys.executable, str(script), str(ckpt), "--outtype", "q8_0", "--outfile", str(out)],
                         ch.log, ch.env)
        if m.returncode != 0:
            return {"measured": False, "reason": f"exit code {m.returncode}: {log_tail(ch.log)}"}
        secs.append(m.seconds)
        rss.append(m.peak_rss_bytes)
    size = out.stat().st_size
    out.unlink()
    return {"measured": True, "script": str(script), "text_bytes": size, "seconds": summarize(secs),
            "peak_rss_bytes": summarize(rss), "input_bytes_per_s": summarize([ckpt_bytes / s for s in secs]),
            "peak_rss_note": f"wait4 rusage of the script's process, never below the bench's own RSS at the fork "
                             f"({current_rss() / 1e6:.0f} MB)"}


# ---------------------------------------------------------------------------------------------------------------
# sections 2 and 3: prefill, decode, roofline

def _method_figures(data: dict, decode_tokens: int, peak_rss_bytes: int) -> dict:
    return {"prefill_tokens_per_s": summarize([PROMPT_TOKENS / s for s in data["prefill_seconds"]]),
            "decode_tokens_per_s": summarize([decode_tokens / s for s in data["decode_seconds"]]),
            "peak_rss_bytes": peak_rss_bytes}


def _vs(methods: dict, base: str, key: str) -> dict:
    """Each method's median ``key`` against ``base``'s."""
    ref = methods[base][key]["median"]
    return {k: _ratio(v[key]["median"], ref) for k, v in methods.items()}


def decode_section(ch: Children, gguf: Path, runs: int, decode_tokens: int) -> dict:
    """Section 2 for one text GGUF: a child per method, all in one load mode: the one our ``Decoder`` picks by
    default for this file here (its first child reports it), given to the raw loop and ``Llama`` explicitly."""
    n_ctx = -(-(PROMPT_TOKENS + decode_tokens + CTX_MARGIN) // CTX_ROUNDING) * CTX_ROUNDING
    base = {"gguf": str(gguf), "n_ctx": n_ctx, "n_batch": PROMPT_TOKENS, "threads": ch.threads,
            "prompt_tokens": PROMPT_TOKENS, "decode_tokens": decode_tokens, "runs": runs, "mmap": None,
            "repack": True}
    methods = {}
    for method in DECODE_METHODS:  # kimivl_edge first
        say(f"prefill + decode, {gguf.name}, {method}")
        data, m = ch.run(dict(base, kind="decode", method=method))
        methods[method] = _method_figures(data, decode_tokens, m.peak_rss_bytes)
        base.update(mmap=data["mmap"], repack=data["repack"])
    return {
        "gguf_bytes": gguf.stat().st_size, "n_ctx": n_ctx, "n_batch": PROMPT_TOKENS, "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": decode_tokens, "load_mode": {"mmap": base["mmap"], "repack": base["repack"]},
        "methods": methods,
        "decode_vs_raw_loop": _vs(methods, "llama_decode_loop", "decode_tokens_per_s"),
        "prefill_vs_raw_loop": _vs(methods, "llama_decode_loop", "prefill_tokens_per_s"),
    }


def edge_vs_llama(decode: dict) -> dict:
    """Issue 8's recipe target: our runtime on our Q4_K_EDGE file vs llama.cpp (raw llama_decode loop and
    llama-cpp-python) on llama.cpp's own Q4_K_M recipe, decode tokens/s."""
    ours = decode["q4_k_edge"]["methods"]["kimivl_edge"]["decode_tokens_per_s"]["median"]
    theirs = decode["q4_k_m"]["methods"]
    return {k: _ratio(ours, theirs[k]["decode_tokens_per_s"]["median"])
            for k in ("llama_decode_loop", "llama_cpp_python")}


def roofline_section(gguf: Path, decode: dict, bandwidth: float) -> dict:
    """Section 3 for one text GGUF: the ceiling reads weights + the KV cache at the mean decode position."""
    model = RooflineModel.read(gguf)
    bpt = model.bytes_per_token()
    mean_pos = int(decode["prompt_tokens"] + decode["decode_tokens"] / 2)
    kv = model.kv_bytes_per_token(mean_pos)
    ceiling = bandwidth / (bpt["total"] + kv)
    achieved = {k: v["decode_tokens_per_s"]["median"] for k, v in decode["methods"].items()}
    return {"bytes_per_token": bpt, "kv_bytes_per_token": kv, "kv_note": f"f16 cache, {model.n_layer} layers x "
            f"{mean_pos} positions x {model.kv_values_per_position} values (mean decode position)",
            "read_bandwidth_bytes_per_s": bandwidth, "ceiling_tokens_per_s": ceiling,
            "achieved_tokens_per_s": achieved,
            "fraction_of_ceiling": {k: v / ceiling for k, v in achieved.items()}}


# ---------------------------------------------------------------------------------------------------------------
# section 4: vision encode

def _vision_item(it: dict, hparams: dict, gemm: float) -> dict:
    """One image size of one (mmproj, backend): seconds, GFLOP/s and the fraction of the GEMM peak."""
    flops = vision_flops(tuple(it["grid"]), **hparams)
    sec = summarize(it["seconds"])
    patches = it["grid"][0] * it["grid"][1]
    return {"image": it["image"], "grid": it["grid"], "patches": patches, "tokens": patches // hparams["merge"] ** 2,
            "gflop": flops / 1e9, "seconds": sec, "gflop_per_s": flops / 1e9 / sec["median"],
            "fraction_of_gemm_peak": flops / sec["median"] / gemm, "peak_rss_bytes": it["peak_rss_bytes"]}


def _vision_note(preset: str) -> str:
    note = ("sizes are before the processor's resize (grid = patches after it); peak RSS per size is the process's "
            "VmHWM after that size (sizes run in increasing order, after one warm-up encode of the smallest)")
    if preset == "tiny":
        note += "; tiny preset: 448x448 and 640x360 only, to stay quick (a3b: 448x448, 896x896, 1920x1080)"
    return note


def vision_section(ch: Children, paths: dict[str, Path], gemm: float, preset: str, runs: int) -> dict:
    """Section 4: one child per (mmproj type, backend), image sizes in increasing order."""
    sizes = VISION_SIZES[preset]
    results, hparams = [], None
    for mt in MMPROJ_TYPES:
        mmproj = paths["mmproj_" + mt]
        for backend in VISION_BACKENDS:
            say(f"vision encode, {mmproj.name}, {backend}")
            data, _ = ch.run({"kind": "vision", "mmproj": str(mmproj), "backend": backend, "sizes": sizes,
                              "runs": runs, "threads": ch.threads})
            hparams = data["hparams"]
            results.append({"mmproj_type": mt, "backend": backend, "available": data["available"],
                            "error": data["error"], "mmproj_bytes": mmproj.stat().st_size,
                            "warmup_seconds": data.get("warmup_seconds"),
                            "items": [_vision_item(it, hparams, gemm) for it in data["items"]]})
    return {"sizes": [f"{w}x{h}" for w, h in sizes], "note": _vision_note(preset), "gemm_flops_per_s": gemm,
            "hparams": hparams, "results": results}


# ---------------------------------------------------------------------------------------------------------------
# section 5: time to first token

def ttft_section(ch: Children, text: Path, mmproj: Path, runs: int) -> dict:
    """Section 5 with the Q4_K_M text GGUF and the Q8_0 mmproj, numpy vision backend (the chat defaults)."""
    say(f"time to first token, {text.name} + {mmproj.name}")
    data, m = ch.run({"kind": "ttft", "text": str(text), "mmproj": str(mmproj), "threads": ch.threads,
                      "runs": runs, "image": list(TTFT_IMAGE), "question": TTFT_QUESTION,
                      "followup": FOLLOWUP_QUESTION})
    kv = RooflineModel.read(text).kv_bytes_per_token(data["n_ctx"])
    sizes = text.stat().st_size + mmproj.stat().st_size
    return {
        "text_gguf_bytes": text.stat().st_size, "mmproj_gguf_bytes": mmproj.stat().st_size,
        "image": f"{TTFT_IMAGE[0]}x{TTFT_IMAGE[1]}", "question": TTFT_QUESTION,
        "image_tokens": data["image_tokens"], "prompt_tokens": data["prompt_tokens"],
        "load_seconds": data["load_seconds"], "ttft_seconds": summarize(data["ttft"]),
        "encode_seconds": summarize(data["encode"]), "prefill_seconds": summarize(data["prefill"]),
        "followup_seconds": summarize(data["followup"]), "followup_evaluated_tokens": data["followup_evaluated"][-1],
        "rss_after_load_bytes": data["rss_after_load_bytes"], "peak_rss_bytes": m.peak_rss_bytes,
        "kv_cache_bytes": kv, "n_ctx": data["n_ctx"], "peak_rss_over_gguf": m.peak_rss_bytes / sizes,
    }


def _prefix_rows(ch: Children, task: dict, runs: int, label: str) -> dict:
    """One input's prefix-cache rows: per run, a process fills an empty cache with a first question, a new process
    asks a follow-up with that cache, another without any."""
    rows: dict[str, list[dict]] = {"fill": [], "hit": [], "off": []}
    for r in range(runs):
        cache = ch.workdir / f"prefix-cache-{label}-{r}"
        for name, question, cache_dir in (("fill", TTFT_QUESTION, cache), ("hit", FOLLOWUP_QUESTION, cache),
                                          ("off", FOLLOWUP_QUESTION, None)):
            data, _ = ch.run({**task, "kind": "prefix", "question": question,
                              "cache_dir": None if cache_dir is None else str(cache_dir)})
            rows[name].append(data)
    hit, off = rows["hit"], rows["off"]
    # what the restore replaced: the off run's encode + prefill, less the new tokens the hit run still prefilled
    recompute = [o["encode"] + o["prefill"] - h["prefill"] for h, o in zip(hit, off)]
    image_tokens = hit[-1]["image_tokens"]
    return {
        "image_tokens": image_tokens,
        "prompt_tokens": hit[-1]["prompt_tokens"], "restored_tokens": hit[-1]["restored_tokens"],
        "hit_evaluated_tokens": hit[-1]["evaluated_tokens"], "off_evaluated_tokens": off[-1]["evaluated_tokens"],
        "ttft_hit_seconds": summarize([h["ttft"] for h in hit]),
        "ttft_off_seconds": summarize([o["ttft"] for o in off]),
        "ttft_fill_seconds": summarize([f["ttft"] for f in rows["fill"]]),
        "load_seconds": summarize([x["load_seconds"] for x in hit + off]),
        "restore_seconds": summarize([h["restore_seconds"] for h in hit]),
        "recompute_seconds": summarize(recompute),
        "restore_over_recompute": summarize([h["restore_seconds"] / c for h, c in zip(hit, recompute)]),
        "cache_bytes": rows["fill"][-1]["cache_bytes"],
        "cache_bytes_per_image_token": rows["fill"][-1]["cache_bytes"] / image_tokens,
    }


def prefix_section(ch: Children, text: Path, mmproj: Path, work: Path, runs: int) -> dict:
    """Section 7: the same image, or the same 10-page PDF (bench/media.py), a new question, in a new process, with
    the prefix cache (filled by an earlier process that asked the first question) and without it. Each run starts
    from an empty cache directory."""
    from .media import PAGE_PATCHES, make_inputs

    say(f"prefix cache, {text.name} + {mmproj.name}")
    pdf, _ = make_inputs(work / "media")
    base = {"text": str(text), "mmproj": str(mmproj), "threads": ch.threads, "n_ctx": 8192}
    image = _prefix_rows(ch, {**base, "image": list(TTFT_IMAGE)}, runs, "image")
    document = _prefix_rows(ch, {**base, "document": str(pdf), "page_patches": PAGE_PATCHES}, runs, "pdf")
    return {"image": {**image, "input": f"one {TTFT_IMAGE[0]}x{TTFT_IMAGE[1]} image"},
            "pdf": {**document, "input": f"a 10-page PDF ({PAGE_PATCHES} patches per page)"}}


def media_section(ch: Children, text: Path, mmproj: Path, work: Path, runs: int) -> dict:
    """Section 8: video decode + sampling and PDF rendering speed; first and second question about a 16-frame video
    and a 10-page PDF (kimivl_edge/bench/media.py), same pair as section 5."""
    from .media import PAGE_PATCHES

    say(f"video and PDF, {text.name} + {mmproj.name}")
    data, m = ch.run({"kind": "media", "text": str(text), "mmproj": str(mmproj), "threads": ch.threads,
                      "runs": runs, "n_ctx": 8192, "page_patches": PAGE_PATCHES, "workdir": str(work / "media")})
    return {"decode_frames_per_s": summarize(data["decode_frames_per_s"]),
            "render_seconds_per_page": summarize(data["render_seconds_per_page"]),
            "frames": data["frames"], "pages": data["pages"], "page_patches": PAGE_PATCHES,
            "video": data["video"], "pdf": data["pdf"], "peak_rss_bytes": m.peak_rss_bytes}


def not_measured(res: dict) -> list[str]:
    """What this run could not measure, one line each."""
    out = []
    if not res["conversion"]["llama_convert"].get("measured"):
        out.append("llama.cpp's convert_hf_to_gguf.py: " + res["conversion"]["llama_convert"]["reason"])
    for r in res["vision"]["results"]:
        if not r["available"]:
            out.append(f"vision {r['backend']} on {r['mmproj_type'].upper()}: {r['error']}")
    out.append("cold-cache reads in sections 1-8 (the page cache is dropped only for section 9's cold runs; see "
               "conversion.raw_read.page_cache_note)")
    return out
