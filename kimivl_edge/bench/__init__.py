"""`kimivl-edge bench`: speed and memory of the whole pipeline, side by side with llama.cpp and the machine's limits.

    kimivl-edge bench [--preset a3b|tiny] [--layers N] [--threads N] [--out DIR] [--runs N] [--llama-convert PATH]

One run writes DIR/bench.md (markdown tables) and DIR/bench.json (every figure):

1. conversion of a synthetic checkpoint (``synth``, random bf16 weights; ``--layers N`` makes the text and vision
   towers N layers deep, every other dimension the preset's) to Q4_K_EDGE, Q4_K_M and Q8_0, each in one pass (the
   K-quants by ggml's own C quantizer): wall time, peak RSS, input bytes/s against one plain read of the same
   safetensors files; optionally llama.cpp's ``convert_hf_to_gguf.py``;
2. prefill (512 tokens) and decode tokens/s on each text GGUF through our runtime (``Decoder`` + ``SamplerChain``,
   what ``KimiVL.stream_tokens`` runs), a minimal raw ``llama_decode`` loop, and llama-cpp-python's ``Llama.generate``,
   all with the same model, context, thread settings and load mode (our ``Decoder``'s default for the file here,
   stated in the table);
3. the roofline: measured memory read bandwidth, weight bytes read per decoded token (from the GGUF), ceiling and
   achieved tokens/s;
4. vision encode per mmproj type (F16, Q8_0, Q4_0) and image size: numpy backend decoding weights per layer, numpy
   with cached weights, ggml (llama.cpp's clip); GFLOP/s against a measured float32 GEMM peak; peak RSS;
5. time to first token for a 448x448 image + a short question, a follow-up question about the same image, and the
   memory of a process with the model loaded against the GGUF sizes;
6. ``kimivl-edge serve`` over loopback (httpx, streamed) against the in-process API: time to first token, decode
   tokens/s, follow-up time, and completion tokens/s of 1, 2 and 4 concurrent clients.
7. the prefix cache: the same image, a new question, in a new process: time to first token with the cache (filled
   by an earlier process) and with it disabled, restore seconds against the encode + prefill they replace, cache
   bytes per image token;
8. video and PDF (``media``);
9. cold start: process start to the first token of ``kimivl-edge run`` (448x448 image + a short question) against
   llama.cpp's own ``llama-mtmd-cli`` (built from the vendored sources by ``llama_tools``) on the same pair, with a
   warm page cache and with the GGUF files dropped from it, and the ratio;
10. our decoder's load modes (mmap on/off x repack on/off): load seconds, peak RSS, prefill and decode tokens/s, and
    the mode the figures favour against the default;
11. vision encode: the numpy encoder and our binding of llama.cpp's clip graph against the encode time
    ``llama-mtmd-cli`` logs, 448x448 and 896x896.

Every figure is the median of ``--runs`` runs with min and max. Each measured step runs in its own child process
(``python -c`` on ``child_main``), so peak RSS is that process's own (``wait4`` rusage / ``VmHWM``).

Modules: ``probes`` (the machine, RSS, read bandwidth, GEMM peak, raw read), ``roofline`` (bytes per token, KV
bytes, vision FLOPs), ``harness`` (child processes, the first-byte timer), ``tasks`` (the measured child steps),
``sections`` (the parent side of each section: child runs -> figures), ``server`` (section 6, both sides),
``coldstart`` (sections 9-11, parent side), ``mtmd`` (llama-mtmd-cli's command line and log), ``pagecache``
(eviction, mincore), ``llama_tools`` (building llama.cpp's tools), ``report`` (bench.md), ``cli`` (options,
``run_bench``, ``main``). ``python -m kimivl_edge.bench.decode|server|prefix|coldstart`` run sections 2-3, 6, 7
and 9-11 alone on given files.
"""
from __future__ import annotations

from .cli import BenchOptions, main, run_bench
from .harness import child_main
from .report import render_markdown, write_outputs

__all__ = ["BenchOptions", "child_main", "main", "render_markdown", "run_bench", "write_outputs"]
