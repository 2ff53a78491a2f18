"""bench.md from the bench.json dictionary (one renderer per section), and writing both files."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .sections import TEXT_TYPES, mode_name
from .server import server_markdown

METHOD_NAMES = {"kimivl_edge": "kimivl-edge (Decoder + SamplerChain)", "llama_decode_loop": "raw llama_decode loop",
                "llama_cpp_python": "llama-cpp-python Llama.generate"}


def _fmt(stat: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """``median (min–max)`` of a summarize() dict, divided by ``scale``."""
    if stat is None:
        return "–"

    def f(x: float) -> str:
        return f"{x / scale:.{digits}f}"

    if stat["min"] == stat["max"]:
        return f(stat["median"])
    return f"{f(stat['median'])} ({f(stat['min'])}–{f(stat['max'])})"


def _gb(n: float | None) -> str:
    return "–" if n is None else (f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB")


IDLE_LOAD = 0.3  # a 1-minute load average below this: nothing else was running


def load_sentence(avg: list[float] | None, cpus: int) -> str:
    """The 1-minute load average before the run, and what it means for the figures."""
    if not avg:
        return "not available on this system"
    if avg[0] < IDLE_LOAD:
        return f"{avg[0]:.2f} (below {IDLE_LOAD}: the machine was idle)"
    return (f"{avg[0]:.2f} (other processes were running: on average {avg[0]:.1f} runnable for {cpus} CPUs, so "
            "the figures are pessimistic and noisy)")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _header(r: dict) -> list[str]:
    m, lim = r["machine"], r["limits"]
    return [f"# kimivl-edge bench: {r['preset']}" + (f", --layers {r['layers']}" if r["scaled"] else ""), "",
            f"Command: `{r['command']}`  ", f"Started {r['started']}, {r['total_seconds']:.0f} s in all; "
            f"{r['runs']} run(s) per figure: median (min–max); {r['threads']} thread(s).  ",
            f"Machine: {m['cpu_model']} (family {m['cpu_family']}, model {m['cpu_model_number']}; "
            f"{', '.join(m['cpu_flags'])}), {m['logical_cpus']} logical CPUs, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
            f"{m['os']}, Python {m['python']}, numpy {m['numpy']}, llama-cpp-python {m['llama_cpp_python']}.  ",
            f"Load average (1 min) before the run: {load_sentence(m['load_average'], m['logical_cpus'])}.  ",
            f"Model: {r['scale_note']}.", "",
            f"Machine limits: read bandwidth {_fmt(lim['read_bandwidth_bytes_per_s'], 1e9, 1)} GB/s; float32 GEMM "
            f"peak {_fmt(lim['gemm_flops_per_s'], 1e9, 1)} GFLOP/s.", ""]


def _conversion(r: dict) -> list[str]:
    c, ck = r["conversion"], r["checkpoint"]
    lines = ["## 1. Conversion", "",
             f"Synthetic checkpoint: {ck['text_layers']} text / {ck['vision_layers']} vision layers, "
             f"{_gb(ck['bytes'])} bf16 in {ck['files']} files (synth {ck['synth_seconds']:.1f} s, peak RSS "
             f"{_gb(ck['synth_peak_rss_bytes'])}). "
             f"{c['raw_read']['page_cache_note']}.", "",
             "| step | output | wall s | peak RSS GB | input MB/s | vs raw read |", "|---|---|---|---|---|---|",
             f"| raw read of the safetensors | – | {_fmt(c['raw_read']['seconds'])} | – | "
             f"{_fmt(c['raw_read']['bytes_per_s'], 1e6, 0)} | 100 % |"]
    for tt in TEXT_TYPES:
        x = c[tt]
        lines.append(f"| kimivl-edge convert → {tt.upper()} text + {x['mmproj_type'].upper()} mmproj | "
                     f"{_gb(x['text_bytes'])} + {_gb(x['mmproj_bytes'])} | {_fmt(x['seconds'])} | "
                     f"{_fmt(x['peak_rss_bytes'], 1e9)} | {_fmt(x['input_bytes_per_s'], 1e6, 0)} | "
                     f"{_pct(x['fraction_of_raw_read'])} |")
    x = c["mmproj_f16"]
    lines.append(f"| kimivl-edge → F16 mmproj only | {_gb(x['mmproj_bytes'])} | {_fmt(x['seconds'])} | "
                 f"{_fmt(x['peak_rss_bytes'], 1e9)} | – | – |")
    lc = c["llama_convert"]
    if lc.get("measured"):
        lines.append(f"| llama.cpp convert_hf_to_gguf.py → Q8_0 | {_gb(lc['text_bytes'])} | {_fmt(lc['seconds'])} | "
                     f"{_fmt(lc['peak_rss_bytes'], 1e9)} | {_fmt(lc['input_bytes_per_s'], 1e6, 0)} | – |")
    else:
        lines.append(f"| llama.cpp convert_hf_to_gguf.py | not measured: {lc['reason']} | | | | |")
    return lines


def _decode(r: dict) -> list[str]:
    lines = ["", "## 2. Prefill and decode", "",
             "| text GGUF | runtime | load mode | prefill tok/s (512 tokens) | decode tok/s | decode vs raw loop | "
             "prefill vs raw loop | peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
    for tt in TEXT_TYPES:
        d = r["decode"][tt]
        for k, v in d["methods"].items():
            lines.append(f"| {tt.upper()} ({_gb(d['gguf_bytes'])}) | {METHOD_NAMES[k]} | "
                         f"{mode_name(**d['load_mode'])} | "
                         f"{_fmt(v['prefill_tokens_per_s'], 1, 1)} | {_fmt(v['decode_tokens_per_s'], 1, 1)} | "
                         f"{_pct(d['decode_vs_raw_loop'][k])} | "
                         f"{_pct(d['prefill_vs_raw_loop'][k])} | {v['peak_rss_bytes'] / 1e9:.2f} |")
    ev = r["decode"]["edge_vs_llama_q4_k_m"]
    lines += ["", f"Our runtime on Q4_K_EDGE vs llama.cpp on its Q4_K_M, decode: {_pct(ev['llama_decode_loop'])} of "
              f"the raw llama_decode loop, {_pct(ev['llama_cpp_python'])} of llama-cpp-python."]
    d0 = r["decode"][TEXT_TYPES[0]]
    lines += ["", f"Context {d0['n_ctx']}, batch {d0['n_batch']}, f16 KV cache, no flash attention, greedy; each run: "
              f"a new random {d0['prompt_tokens']}-token prompt, then {d0['decode_tokens']} decoded tokens. The three "
              "runtimes on a file load it the same way: our Decoder's default for that file here (section 10), "
              "given to the other two.", ""]
    return lines


def _roofline(r: dict) -> list[str]:
    lines = ["## 3. Roofline (decode)", "",
             "| text GGUF | weights/token | of which routed experts | attention | head | KV/token | ceiling tok/s | "
             "kimivl-edge | raw loop | llama-cpp-python |", "|---|---|---|---|---|---|---|---|---|---|"]
    for tt in TEXT_TYPES:
        f = r["roofline"][tt]
        b, fr = f["bytes_per_token"], f["fraction_of_ceiling"]
        lines.append(f"| {tt.upper()} | {_gb(b['total'])} | {_gb(b['routed_experts'])} | {_gb(b['attention'])} | "
                     f"{_gb(b['head'])} | {_gb(f['kv_bytes_per_token'])} | {f['ceiling_tokens_per_s']:.1f} | "
                     f"{_pct(fr['kimivl_edge'])} | {_pct(fr['llama_decode_loop'])} | {_pct(fr['llama_cpp_python'])} |")
    bw = r["roofline"][TEXT_TYPES[0]]["read_bandwidth_bytes_per_s"]
    lines += ["", f"Ceiling = read bandwidth / (weight bytes + KV bytes per token); the last three columns are "
              f"achieved / ceiling. Every row uses the one bandwidth measured at the start ({bw / 1e9:.1f} GB/s, the "
              f"median above); method: {r['limits']['read_bandwidth_method']}.", ""]
    return lines


def _vision(r: dict) -> list[str]:
    v = r["vision"]
    lines = ["## 4. Vision encode", "", f"Note: {v['note']}. GFLOP counts the matrix products only; % of the "
             f"{v['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s GEMM peak.", "",
             "| mmproj | backend | image | grid (patches) | seconds | GFLOP/s | % GEMM peak | peak RSS GB |",
             "|---|---|---|---|---|---|---|---|"]
    for res in v["results"]:
        label = f"{res['mmproj_type'].upper()} ({_gb(res['mmproj_bytes'])})"
        if not res["available"]:
            lines.append(f"| {label} | {res['backend']} | unavailable: {res['error']} | | | | | |")
            continue
        for it in res["items"]:
            lines.append(f"| {label} | {res['backend']} | {it['image']} | {it['grid'][0]}x{it['grid'][1]} "
                         f"({it['patches']}) | {_fmt(it['seconds'])} | {it['gflop_per_s']:.1f} | "
                         f"{_pct(it['fraction_of_gemm_peak'])} | {it['peak_rss_bytes'] / 1e9:.2f} |")
    warm = [f"{x['mmproj_type'].upper()} {x['backend']} {x['warmup_seconds']:.2f}" for x in v["results"]
            if x["available"]]
    lines += ["", f"First encode of the smallest image in each process (numpy-cached: includes decoding every weight "
              f"into the cache), s: {'; '.join(warm)}."]
    return lines


def _ttft(r: dict) -> list[str]:
    t = r["ttft"]
    return ["", "## 5. Time to first token and memory", "",
            f"Q4_K_M text ({_gb(t['text_gguf_bytes'])}) + Q8_0 mmproj ({_gb(t['mmproj_gguf_bytes'])}), numpy "
            f"vision, context {t['n_ctx']}; one {t['image']} image ({t['image_tokens']} image tokens, "
            f"{t['prompt_tokens']} prompt tokens in all) + \"{t['question']}\".", "",
            "| figure | value |", "|---|---|",
            f"| time to first token, s | {_fmt(t['ttft_seconds'])} |",
            f"| of which vision encode, s | {_fmt(t['encode_seconds'])} |",
            f"| of which prefill, s | {_fmt(t['prefill_seconds'])} |",
            f"| follow-up question, same image (first token), s | {_fmt(t['followup_seconds'])} "
            f"({t['followup_evaluated_tokens']} tokens evaluated) |",
            f"| model load, s | {t['load_seconds']:.2f} |",
            f"| RSS after load | {_gb(t['rss_after_load_bytes'])} |",
            f"| peak RSS of the process | {_gb(t['peak_rss_bytes'])} |",
            f"| GGUF files (text + mmproj) | {_gb(t['text_gguf_bytes'] + t['mmproj_gguf_bytes'])} |",
            f"| KV cache ({t['n_ctx']} positions, f16) | {_gb(t['kv_cache_bytes'])} |",
            f"| peak RSS / GGUF size | {t['peak_rss_over_gguf']:.2f} |", ""]


def _prefix(r: dict) -> list[str]:
    p = r["prefix_cache"]
    im, pdf = p["image"], p["pdf"]

    def row(label: str, f: Callable[[dict], str]) -> str:
        return f"| {label} | {f(im)} | {f(pdf)} |"

    return ["## 7. Prefix cache: the same image or PDF, a new question, a new process", "",
            "Q4_K_M + Q8_0 as in section 5. One process asks a first question (filling an empty cache), a new "
            "process asks another question about the same input with the cache, and another without it. Time to "
            "first token after the model is loaded.", "",
            f"| figure | {im['input']} | {pdf['input']} |", "|---|---|---|",
            row("image tokens", lambda x: str(x["image_tokens"])),
            row("time to first token with the cache, s", lambda x: f"{_fmt(x['ttft_hit_seconds'])} "
                f"({x['restored_tokens']} positions restored, {x['hit_evaluated_tokens']} evaluated)"),
            row("time to first token, cache disabled, s",
                lambda x: f"{_fmt(x['ttft_off_seconds'])} ({x['off_evaluated_tokens']} evaluated)"),
            row("first question, filling the cache, s", lambda x: _fmt(x["ttft_fill_seconds"])),
            row("restore, s", lambda x: _fmt(x["restore_seconds"])),
            row("what it replaced (encode + prefill of the prefix), s", lambda x: _fmt(x["recompute_seconds"])),
            row("restore / recompute", lambda x: _fmt(x["restore_over_recompute"], digits=3)),
            row("cache entry", lambda x: f"{x['cache_bytes'] / 1e6:.2f} MB, "
                f"{x['cache_bytes_per_image_token'] / 1e3:.1f} kB per image token"),
            row("model load (every process), s", lambda x: _fmt(x["load_seconds"])), ""]


def _media(r: dict) -> list[str]:
    m = r["media"]

    def row(name: str, t: dict) -> str:
        return (f"| {name} | {t['image_tokens']} | {t['ttft_seconds']:.2f} | {t['media_seconds']:.2f} | "
                f"{t['encode_seconds']:.2f} | {t['prefill_seconds']:.2f} | {t['evaluated_tokens']} of "
                f"{t['prompt_tokens']} |")

    return ["", "## 8. Video and PDF", "",
            f"Same pair as section 5; a {m['frames']}-frame video (640x360, MediaSettings defaults) and a "
            f"{m['pages']}-page Letter PDF ({m['page_patches']} patches per page).", "",
            f"Video decode + sampling: {_fmt(m['decode_frames_per_s'])} frames/s; PDF render: "
            f"{_fmt(m['render_seconds_per_page'], digits=3)} s/page.", "",
            "| question | image tokens | first token, s | media decode, s | encode, s | prefill, s | evaluated |",
            "|---|---|---|---|---|---|---|",
            row("video, first", m["video"]["first"]), row("video, second", m["video"]["second"]),
            row("PDF, first", m["pdf"]["first"]), row("PDF, second", m["pdf"]["second"]), ""]


def _cold_start(c: dict, threads: str) -> list[str]:
    x, rows = c["cold_start"], c["cold_start"]["rows"]
    lines = ["## 9. Cold start against llama-mtmd-cli", "",
             f"`kimivl-edge run` and llama.cpp's own `llama-mtmd-cli` on the same pair ({_gb(x['files_bytes'])}), "
             f"one {x['image']} image + \"{x['question']}\", greedy, {x['tokens']} tokens, context {x['n_ctx']}, "
             f"{threads}, our prefix cache off. First token, for both: the first byte the process writes to stdout "
             "after its fixed preamble (llama-mtmd-cli: the one newline it writes once the prompt is evaluated; "
             "ours: none), read unbuffered through a pipe, timed from the process start. Cold: before each cold "
             "run both GGUF files are flushed and dropped from the page cache (fsync, then "
             "posix_fadvise(POSIX_FADV_DONTNEED), no root needed); mincore on a fresh mapping found at most "
             f"{_pct(x['resident_before_cold_max'])} of their pages still resident before a cold run. Warm: both "
             f"files read whole before each warm run (at least {_pct(x['resident_before_warm_min'])} resident). The "
             "Python interpreter, the packages and the tool's binary stay cached in both.", "",
             "| page cache | kimivl-edge: first token s | llama-mtmd-cli: first token s | ours / llama-mtmd-cli | "
             "kimivl-edge: exit s | llama-mtmd-cli: exit s | peak RSS GB, ours / theirs |",
             "|---|---|---|---|---|---|---|"]
    for cache in ("warm", "cold"):
        o, t = rows[f"kimivl_edge/{cache}"], rows[f"llama_mtmd_cli/{cache}"]
        lines.append(f"| {cache} | {_fmt(o['first_token_seconds'])} | {_fmt(t['first_token_seconds'])} | "
                     f"{x['ours_over_mtmd'][cache]:.2f} | {_fmt(o['exit_seconds'])} | {_fmt(t['exit_seconds'])} | "
                     f"{o['peak_rss_bytes']['median'] / 1e9:.2f} / {t['peak_rss_bytes']['median'] / 1e9:.2f} |")
    lines += ["", "Commands (the image is a noise PNG in the bench's work folder):", ""]
    lines += [f"    {cmd}" for cmd in x["commands"].values()]
    return lines + [""]


def _load_modes(c: dict) -> list[str]:
    x = c["load_modes"]
    lines = ["## 10. Load modes of our decoder", "",
             f"{x['gguf']} ({_gb(x['gguf_bytes'])}), `Decoder` (`--mmap on|off`, `--no-repack`), a new process per "
             f"mode and run, modes alternating; warm page cache; then a {x['prompt_tokens']}-token prefill and "
             f"{x['decode_tokens']} decoded tokens (context {x['n_ctx']}).", "",
             "| load mode | load s | peak RSS GB | prefill tok/s | decode tok/s |", "|---|---|---|---|---|"]
    reasons = []
    for name, row in x["rows"].items():
        if not row["available"]:
            reasons += [] if row["reason"] in reasons else [row["reason"]]
            lines.append(f"| {name} | {row['reason'].split(':')[0]} (below) | | | |")
            continue
        lines.append(f"| {name} | {_fmt(row['load_seconds'])} | {_fmt(row['peak_rss_bytes'], 1e9)} | "
                     f"{_fmt(row['prefill_tokens_per_s'], 1, 1)} | {_fmt(row['decode_tokens_per_s'], 1, 1)} |")
    follows = "the same mode" if x["favoured"] == x["default"] else "a different mode"
    lines += [""] + [f"Repack {r}." for r in reasons]
    lines += ["", f"The figures favour {x['favoured']} (of the modes within 10 % of the lowest peak RSS, those "
              "within 5 % of the fastest decode among them; of these, the fastest to load). The default here "
              f"(`--mmap auto`, repack on where safe) is {x['default']}: {follows}.", ""]
    return lines


def _vision_mtmd(c: dict, threads: str) -> list[str]:
    x = c["vision_mtmd"]
    fa = {True: "on", False: "off", None: "not reported"}[x["mtmd_flash_attention"]]
    lines = ["## 11. Vision encode against llama-mtmd-cli", "",
             f"{x['mmproj']}, {threads}. numpy, and our binding of llama.cpp's clip graph (ggml: as our runtime runs "
             "it, no flash attention; ggml-flash: with it): one encode in a new process after a 56x56 warm-up "
             "encode. llama-mtmd-cli: the \"mtmd batch encoding done in N ms\" its log reports for the image of "
             f"one turn (after its own warm-up at load); flash attention in its vision graph: {fa} (its log; its "
             "default is auto).", "",
             "| image | numpy s | ggml s | ggml-flash s | llama-mtmd-cli s | numpy / llama-mtmd-cli | "
             "ggml / llama-mtmd-cli | ggml-flash / llama-mtmd-cli |", "|---|---|---|---|---|---|---|---|"]
    for size, row in x["rows"].items():
        ov = x["over_mtmd"][size]
        lines.append(f"| {size} | {_fmt(row['numpy'])} | {_fmt(row['ggml'])} | {_fmt(row['ggml-flash'])} | "
                     f"{_fmt(row['llama_mtmd_cli'])} | {ov['numpy']:.2f} | {ov['ggml']:.2f} | "
                     f"{ov['ggml-flash']:.2f} |")
    return lines + [""]


def coldstart_markdown(r: dict) -> list[str]:
    """Sections 9-11 (``coldstart.coldstart_sections``)."""
    c = r["coldstart"]
    threads = f"{r['threads']} thread(s)" if "threads" in r else "same threads for both"
    return _cold_start(c, threads) + _load_modes(c) + _vision_mtmd(c, threads)


def render_markdown(r: dict) -> str:
    """bench.md from the bench.json dictionary."""
    lines = (_header(r) + _conversion(r) + _decode(r) + _roofline(r) + _vision(r) + _ttft(r) + server_markdown(r)
             + _prefix(r) + _media(r) + coldstart_markdown(r))
    lines += ["## Not measured", ""] + [f"- {s}" for s in r["not_measured"]] + [""]
    return "\n".join(lines)


def write_outputs(r: dict, out: Path) -> tuple[Path, Path]:
    """OUT/bench.json and OUT/bench.md; returns (md, json) paths."""
    out.mkdir(parents=True, exist_ok=True)
    j, md = out / "bench.json", out / "bench.md"
    j.write_text(json.dumps(r, indent=2) + "\n")
    md.write_text(render_markdown(r))
    return md, j
