"""`kimivl-edge bench`: speed and memory of the whole pipeline, side by side with llama.cpp and the machine's limits.

The verb's options, the checks made before anything runs (preset, layers, runs, free disk) and ``run_bench``, which
runs every section in order (``sections``) and returns the bench.json dictionary.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .harness import Children
from .probes import load_average, machine_info
from .report import render_markdown, write_outputs
from .server import server_section
from .sections import (CONVERT_ORDER, DECODE_TOKENS, MMPROJ_FOR_TEXT, TEXT_TYPES, conversion_section,
                       decode_section, edge_vs_llama, limits_section, media_section, not_measured, raw_read_section,
                       prefix_section, roofline_section, say, ttft_section, vision_section)

SCHEMA = 1

# Before the checkpoint exists, the GGUF peak is estimated as this multiple of its size. Every conversion writes its
# files in one pass (no intermediate file) and all of them are kept to the end: on the a3b dimensions the three
# text GGUFs are about 1.15x the bf16 checkpoint (9.55 + 10.54 + ~17.4 GB for 32.8 GB), plus the mmprojs, and
# --llama-convert adds another Q8_0 (1.7x in all). The exact check (``gguf_disk_peak``) follows synth.
GGUF_PEAK_ESTIMATE = 1.4


@dataclass
class BenchOptions:
    preset: str = "a3b"
    layers: int | None = None
    threads: int | None = None
    out: Path = Path("bench")
    runs: int = 3
    llama_convert: Path | None = None
    decode_tokens: int = DECODE_TOKENS
    keep: bool = False

    def validate(self) -> BenchOptions:
        """Raise UsageError (one line) on a preset, depth, run count or script that cannot work."""
        from ..synth import PRESETS

        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        if self.layers is not None and self.layers < 2:
            raise UsageError("--layers must be >= 2 (layer 0 is dense; the MoE layers start at 1)")
        if self.runs < 1:
            raise UsageError("--runs must be >= 1")
        if self.llama_convert is not None and not self.llama_convert.is_file():
            raise UsageError(f"--llama-convert {self.llama_convert}: no such file")
        return self


def scale_note(preset: str, layers: int | None) -> str:
    """What the model measured is: full depth or scaled, the preset's own dimensions or the test model's."""
    from ..synth import preset_config

    cfg = preset_config(preset)
    full = f"{cfg.text.num_hidden_layers} text / {cfg.vision.num_hidden_layers} vision layers"
    if layers is None:
        note = f"full depth ({full})"
    else:
        note = (f"SCALED: --layers {layers}: {layers} text and {layers} vision layers instead of {full}; every other "
                "dimension is the preset's. Per-layer costs are real, totals are not the full model's, and "
                "llama.cpp's Q4_K_M mix (which picks types by layer index) differs from the full model's")
    if preset == "tiny":
        note += "; tiny preset: test-model dimensions, not Kimi-VL's (a smoke run, not a performance figure)"
    return note


# ---------------------------------------------------------------------------------------------------------------
# disk

def gguf_disk_peak(ckpt: Path, gguf_dir: Path, llama_convert: bool) -> int:
    """Peak bytes in ``gguf_dir`` during the conversions, in ``CONVERT_ORDER``: the files already written plus the
    current step's outputs (every conversion is one pass, no intermediate file)."""
    from ..convert import plan_conversion

    held = peak = q8_text = 0
    for outtype in CONVERT_ORDER:
        plan = plan_conversion(ckpt, outtype, MMPROJ_FOR_TEXT[outtype], gguf_dir)
        out = plan.expected_text_bytes() + plan.mmproj.data_bytes
        peak = max(peak, held + out)
        held += out
        if outtype == "q8_0":
            q8_text = plan.expected_text_bytes()
    held += plan_conversion(ckpt, "bf16", "f16", gguf_dir).mmproj.data_bytes
    return max(peak, held + (q8_text if llama_convert else 0))


def synth_bytes(preset: str, layers: int | None) -> int:
    """Bytes of the synthetic checkpoint's tensors (bf16)."""
    from ..checkpoint import hf_tensor_specs
    from ..config import KimiVLConfig
    from ..synth import scaled_config_dict

    specs = hf_tensor_specs(KimiVLConfig.from_dict(scaled_config_dict(preset, "instruct", layers)))
    return sum(2 * math.prod(s.shape) for s in specs)


def check_disk(need: int, where: Path) -> None:
    """Refuse early (one line) when ``need`` bytes do not fit in ``where``."""
    free = shutil.disk_usage(where).free
    if need > free:
        raise UsageError(f"the benchmark needs up to {need / 1e9:.1f} GB in {where}, {free / 1e9:.1f} GB free: pass "
                         "--layers N to scale the model down")


# ---------------------------------------------------------------------------------------------------------------
# the run

def _checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def _checkpoint(o: BenchOptions, ch: Children, ckpt: Path, gguf_dir: Path) -> dict:
    """The synthetic checkpoint, after checking the disk before and after writing it."""
    check_disk(int(synth_bytes(o.preset, o.layers) * (1 + GGUF_PEAK_ESTIMATE)), gguf_dir)
    say(f"synth --preset {o.preset}" + (f" --layers {o.layers}" if o.layers else "") + f" -> {ckpt}")
    data, m = ch.run({"kind": "synth", "outdir": str(ckpt), "preset": o.preset, "layers": o.layers})
    files = _checkpoint_files(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    res = {"preset": o.preset, "text_layers": cfg["text_config"]["num_hidden_layers"],
           "vision_layers": cfg["vision_config"]["num_hidden_layers"], "bytes": sum(f.stat().st_size for f in files),
           "files": len(files), "synth_seconds": data["seconds"], "synth_peak_rss_bytes": m.peak_rss_bytes}
    res["gguf_disk_peak_bytes"] = need = gguf_disk_peak(ckpt, gguf_dir, o.llama_convert is not None)
    check_disk(need, gguf_dir)
    return res


def _measure(o: BenchOptions, ch: Children, work: Path, res: dict) -> None:
    """Every section into ``res``, in bench.json's order."""
    from .coldstart import coldstart_sections, mtmd_tool  # not at import: `python -m kimivl_edge.bench.coldstart`

    gguf_dir, ckpt = work / "gguf", work / "checkpoint"
    mtmd_tool()  # sections 9 and 11 need llama-mtmd-cli: built (or refused) now, not after an hour of measuring
    res["limits"] = limits_section(ch, o.runs)
    bandwidth = res["limits"]["read_bandwidth_bytes_per_s"]["median"]
    gemm = res["limits"]["gemm_flops_per_s"]["median"]
    res["checkpoint"] = _checkpoint(o, ch, ckpt, gguf_dir)
    read = raw_read_section(_checkpoint_files(ckpt), res["checkpoint"]["bytes"], res["machine"]["ram_bytes"], o.runs)
    res["conversion"] = {"raw_read": read}
    rows, paths = conversion_section(ch, ckpt, gguf_dir, read, o.runs, o.llama_convert)
    res["conversion"].update(rows)
    if not o.keep:
        shutil.rmtree(ckpt)
    res["decode"] = {tt: decode_section(ch, paths[tt], o.runs, o.decode_tokens) for tt in TEXT_TYPES}
    res["decode"]["edge_vs_llama_q4_k_m"] = edge_vs_llama(res["decode"])
    res["roofline"] = {tt: roofline_section(paths[tt], res["decode"][tt], bandwidth) for tt in TEXT_TYPES}
    res["vision"] = vision_section(ch, paths, gemm, o.preset, o.runs)
    res["ttft"] = ttft_section(ch, paths["q4_k_m"], paths["mmproj_q8_0"], o.runs)
    res["server"] = server_section(ch, paths["q4_k_m"], paths["mmproj_q8_0"], o.runs, o.decode_tokens)
    res["prefix_cache"] = prefix_section(ch, paths["q4_k_m"], paths["mmproj_q8_0"], work, o.runs)
    res["media"] = media_section(ch, paths["q4_k_m"], paths["mmproj_q8_0"], work, o.runs)
    res["coldstart"] = coldstart_sections(ch, paths["q4_k_m"], paths["mmproj_q8_0"], o.runs, o.decode_tokens)


def run_bench(o: BenchOptions, command: str = "kimivl-edge bench") -> dict:
    """Run every section and return the bench.json dictionary (files are written by ``write_outputs``)."""
    o.validate()
    threads = o.threads or os.cpu_count() or 1
    started, t_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    work = o.out / "bench-work"
    if work.exists():
        shutil.rmtree(work)
    (work / "gguf").mkdir(parents=True)
    res: dict = {"schema": SCHEMA, "command": command, "preset": o.preset, "layers": o.layers,
                 "scaled": o.layers is not None, "scale_note": scale_note(o.preset, o.layers), "runs": o.runs,
                 "threads": threads, "started": started, "machine": machine_info()}
    try:
        _measure(o, Children(work, threads), work, res)
    finally:
        if not o.keep and work.exists():
            shutil.rmtree(work / "checkpoint", ignore_errors=True)
            shutil.rmtree(work / "gguf", ignore_errors=True)
    res["machine"]["load_average_end"] = load_average()
    res["not_measured"] = not_measured(res)
    res["total_seconds"] = time.perf_counter() - t_start
    return res


def main(argv: list[str] | None = None) -> int:
    from ..cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="a3b", choices=("a3b", "tiny"),
                    help="a3b: the real dimensions (a full-depth run needs ~62 GB free disk: the 33 GB checkpoint and "
                         "the GGUFs; and about an hour); "
                         "tiny: a quick smoke run")
    ap.add_argument("--layers", type=int, help="scale the text and vision towers to N layers (N >= 2)")
    ap.add_argument("--threads", type=int, help="CPU threads for every engine (default: all cores)")
    ap.add_argument("--out", default="bench", help="output directory for bench.md and bench.json (default: bench)")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median, min, max; default 3)")
    ap.add_argument("--llama-convert", help="path of llama.cpp's convert_hf_to_gguf.py, to time it too")
    ap.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS, help="tokens decoded per run (default 64)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and GGUFs in OUT/bench-work")
    a = ap.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        raise UsageError("--threads must be >= 1")
    if a.decode_tokens < 1:
        raise UsageError("--decode-tokens must be >= 1")
    o = BenchOptions(preset=a.preset, layers=a.layers, threads=a.threads, out=Path(a.out), runs=a.runs,
                     llama_convert=Path(a.llama_convert) if a.llama_convert else None, decode_tokens=a.decode_tokens,
                     keep=a.keep)
    command = "kimivl-edge bench " + " ".join(argv if argv is not None else sys.argv[1:])
    r = run_bench(o, command.strip())
    md, j = write_outputs(r, o.out)
    print(render_markdown(r))
    print(f"wrote {md} and {j}")
    return 0
