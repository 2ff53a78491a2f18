"""`kimivl-edge bench`: speed and memory of the whole pipeline, side by side with llama.cpp and the machine's limits.

    kimivl-edge bench [--preset a3b|tiny] [--layers N] [--threads N] [--out DIR] [--runs N] [--llama-convert PATH]

One run writes DIR/bench.md (markdown tables) and DIR/bench.json (every figure, fields listed in ``JSON_FIELDS``):

1. conversion of a synthetic checkpoint (``synth``, random bf16 weights; ``--layers N`` makes the text and vision
   towers N layers deep, every other dimension the preset's) to Q8_0 and Q4_K_M: wall time, peak RSS, input bytes/s
   against one plain read of the same safetensors files; optionally llama.cpp's ``convert_hf_to_gguf.py``;
2. prefill (512 tokens) and decode tokens/s on each text GGUF through our runtime (``Decoder`` + ``SamplerChain``,
   what ``KimiVL.stream_tokens`` runs), a minimal raw ``llama_decode`` loop, and llama-cpp-python's ``Llama.generate``,
   all with the same model, context and thread settings;
3. the roofline: measured memory read bandwidth, weight bytes read per decoded token (from the GGUF), ceiling and
   achieved tokens/s;
4. vision encode per mmproj type (F16, Q8_0, Q4_0) and image size: numpy backend decoding weights per layer, numpy
   with cached weights, ggml (llama.cpp's clip); GFLOP/s against a measured float32 GEMM peak; peak RSS;
5. time to first token for a 448x448 image + a short question, a follow-up question about the same image, and the
   memory of a process with the model loaded against the GGUF sizes.

Every figure is the median of ``--runs`` runs with min and max. Each measured step runs in its own child process
(``python -c`` on ``child_main``), so peak RSS is that process's own (``wait4`` rusage / ``VmHWM``).
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import KimiVLError, UsageError

TEXT_TYPES = ("q8_0", "q4_k_m", "q4_k_edge")
CONVERT_ORDER = ("q4_k_edge", "q4_k_m", "q8_0")  # smallest file first
MMPROJ_FOR_TEXT = {"q8_0": "q8_0", "q4_k_m": "q4_0", "q4_k_edge": "q8_0"}   # mmproj written by each conversion run
MMPROJ_TYPES = ("f16", "q8_0", "q4_0")
VISION_BACKENDS = ("numpy", "numpy-cached", "ggml")
DECODE_METHODS = ("kimivl_edge", "llama_decode_loop", "llama_cpp_python")
VISION_SIZES = {"a3b": ((448, 448), (896, 896), (1920, 1080)), "tiny": ((448, 448), (640, 360))}
PROMPT_TOKENS = 512
DECODE_TOKENS = 64
TTFT_IMAGE = (448, 448)
TTFT_QUESTION = "What is in the picture? Describe the image in detail."
FOLLOWUP_QUESTION = "Which colour is most common in it?"
BANDWIDTH_BYTES = 512 << 20
GEMM_N = 2048
N_SPECIAL = 256  # special tokens at the top of the vocabulary (kept out of random prompts)

# Every key of bench.json, by section (tests check them; the markdown is made from them).
JSON_FIELDS = {
    "": ("schema", "command", "preset", "layers", "scaled", "scale_note", "runs", "threads", "started",
         "total_seconds", "machine", "limits", "checkpoint", "conversion", "decode", "roofline", "vision", "ttft",
         "not_measured"),
    "machine": ("cpu_model", "cpu_family", "cpu_model_number", "cpu_flags", "logical_cpus", "ram_bytes", "os",
                "python", "numpy", "llama_cpp_python", "load_average", "load_average_end"),
    "limits": ("read_bandwidth_bytes_per_s", "read_bandwidth_method", "gemm_flops_per_s", "gemm_method"),
    "checkpoint": ("preset", "text_layers", "vision_layers", "bytes", "files", "synth_seconds",
                   "synth_peak_rss_bytes", "gguf_disk_peak_bytes"),
    "conversion": ("raw_read", "q8_0", "q4_k_m", "q4_k_edge", "mmproj_f16", "llama_convert"),
    "conversion.raw_read": ("bytes", "seconds", "bytes_per_s", "page_cache_note"),
    "conversion.q8_0": ("text_type", "mmproj_type", "text_bytes", "mmproj_bytes", "seconds", "peak_rss_bytes",
                        "input_bytes_per_s", "fraction_of_raw_read"),
    "decode": ("q8_0", "q4_k_m", "q4_k_edge", "edge_vs_llama_q4_k_m"),
    "decode.q4_k_m": ("gguf_bytes", "n_ctx", "n_batch", "prompt_tokens", "decode_tokens", "methods",
                      "decode_vs_raw_loop", "prefill_vs_raw_loop"),
    "decode.q4_k_m.methods.kimivl_edge": ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes"),
    "roofline": ("q8_0", "q4_k_m", "q4_k_edge"),
    "roofline.q4_k_m": ("bytes_per_token", "kv_bytes_per_token", "kv_note", "read_bandwidth_bytes_per_s",
                        "ceiling_tokens_per_s", "achieved_tokens_per_s", "fraction_of_ceiling"),
    "roofline.q4_k_m.bytes_per_token": ("attention", "dense_ffn", "shared_experts", "routed_experts", "router",
                                        "norms", "head", "embedding_row", "other", "total"),
    "vision": ("sizes", "note", "gemm_flops_per_s", "hparams", "results"),
    "ttft": ("text_gguf_bytes", "mmproj_gguf_bytes", "image", "question", "image_tokens", "prompt_tokens",
             "load_seconds", "ttft_seconds", "encode_seconds", "prefill_seconds", "followup_seconds",
             "followup_evaluated_tokens", "rss_after_load_bytes", "peak_rss_bytes", "kv_cache_bytes", "n_ctx",
             "peak_rss_over_gguf"),
}
VISION_RESULT_FIELDS = ("mmproj_type", "backend", "available", "error", "mmproj_bytes", "warmup_seconds", "items")
VISION_ITEM_FIELDS = ("image", "grid", "patches", "tokens", "gflop", "seconds", "gflop_per_s",
                      "fraction_of_gemm_peak", "peak_rss_bytes")


# ---------------------------------------------------------------------------------------------------------------
# statistics and process memory

def summarize(values: Sequence[float]) -> dict:
    """Median, min and max of the runs (and the runs themselves)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("no values to summarize")
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


def _proc_status_bytes(key: str) -> int:
    """A ``kB`` line of /proc/self/status (VmHWM = peak RSS, VmRSS = current RSS) in bytes; ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    return _proc_status_bytes("VmHWM")


def current_rss() -> int:
    return _proc_status_bytes("VmRSS")


# ---------------------------------------------------------------------------------------------------------------
# machine and its limits

def machine_info() -> dict:
    """CPU model, family/model numbers and relevant flags from /proc/cpuinfo, logical CPUs, RAM, versions."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    try:
        import importlib.metadata

        lcp = importlib.metadata.version("llama_cpp_python")
    except Exception:  # not installed
        lcp = None
    return {
        "cpu_model": info.get("model name", platform.processor() or "unknown"),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "cpu_flags": sorted(flags & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni"}),
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "llama_cpp_python": lcp,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


BANDWIDTH_METHOD = ("np.bitwise_or.reduce over a {size} uint64 array (written once, so every page is resident; "
                    "far larger than the caches), whole by one thread and in equal slices by {threads} thread(s) "
                    "(numpy releases the GIL); per run the better of the two, each the best of 3 passes; "
                    "bytes read / seconds")
GEMM_METHOD = "numpy float32 matmul of two {n}x{n} matrices (BLAS, {threads} thread(s)), 2n^3 FLOP, best of 3"


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES, threads: int = 1, passes: int = 3) -> float:
    """Memory read bandwidth in bytes/s: a streaming reduction (bitwise OR, a trivial op per 8 bytes) over a large
    resident array, in ``threads`` equal slices, best of ``passes``."""
    a = np.ones(max(nbytes // 8, threads), dtype=np.uint64)
    parts = np.array_split(a, threads)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        best = math.inf
        for _ in range(passes):
            t0 = time.perf_counter()
            if pool is None:
                np.bitwise_or.reduce(a)
            else:
                list(pool.map(np.bitwise_or.reduce, parts))
            best = min(best, time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.shutdown()
    return a.nbytes / best


def gemm_peak(n: int = GEMM_N, passes: int = 3) -> float:
    """float32 GEMM throughput in FLOP/s (2n^3 per n x n product) after one warm-up product, best of ``passes``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = math.inf
    for _ in range(passes):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def raw_read_seconds(files: Sequence[Path], chunk: int = 16 << 20) -> float:
    """Seconds to read ``files`` once, front to back, into a reused buffer (no page cache is dropped)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------
# roofline: weight bytes read per decoded token (llama.cpp's deepseek2 tensor names, reference doc §3.3, §11)

ROLES = ("attention", "dense_ffn", "shared_experts", "routed_experts", "router", "norms", "head", "embedding_row",
         "other")


@dataclass(frozen=True)
class TensorInfo:
    """One GGUF tensor: name, ggml shape ``ne`` (ne[0] = row length) and its bytes in the file."""

    name: str
    ne: tuple[int, ...]
    nbytes: int


def tensor_role(name: str) -> str:
    """What a deepseek2 GGUF tensor is, for the roofline (reference doc §9, §11 names)."""
    if name == "token_embd.weight":
        return "embedding_row"
    if name == "output.weight":
        return "head"
    if "norm" in name:
        return "norms"
    if not name.startswith("blk."):
        return "other"
    leaf = name.split(".", 2)[2]
    if leaf.startswith(("ffn_gate_inp.", "exp_probs_b.")):
        return "router"
    if leaf.startswith("attn_"):
        return "attention"
    if "_exps." in leaf:
        return "routed_experts"
    if "_shexp." in leaf:
        return "shared_experts"
    if leaf.startswith("ffn_"):
        return "dense_ffn"
    return "other"


def bytes_per_token(tensors: Sequence[TensorInfo], n_expert: int, n_expert_used: int) -> dict[str, int]:
    """Weight bytes one decoded token reads, by role, and their ``total``.

    Every tensor is read whole, except: the token embedding (one row: bytes / ne[1]) and the routed experts (each
    ``*_exps`` tensor stacks ``n_expert`` equal slices along its last axis; a token reads ``n_expert_used`` of them,
    reference doc §9.5). Norms, router and biases are read whole. The KV cache is not a weight (see
    ``kv_bytes_per_token``)."""
    if not 0 < n_expert_used <= n_expert:
        raise ValueError(f"n_expert_used {n_expert_used} must be in 1..n_expert ({n_expert})")
    out = dict.fromkeys(ROLES, 0)
    for t in tensors:
        role = tensor_role(t.name)
        if role == "embedding_row":
            b = t.nbytes // t.ne[1]
        elif role == "routed_experts":
            if t.ne[-1] != n_expert or t.nbytes % n_expert:
                raise ValueError(f"{t.name}: ne {t.ne} does not stack {n_expert} experts")
            b = t.nbytes // n_expert * n_expert_used
        else:
            b = t.nbytes
        out[role] += b
    out["total"] = sum(out[r] for r in ROLES)
    return out


def kv_bytes_per_token(n_layer: int, n_past: int, values_per_position: int, bytes_per_value: float = 2.0) -> int:
    """KV-cache bytes one decoded token reads: every cached position of every layer (MLA caches
    ``values_per_position`` = kv_lora_rank + rope dim = 576 values per position and layer, reference doc §9.4)."""
    return int(n_layer * n_past * values_per_position * bytes_per_value)


def gguf_tensor_infos(path: str | os.PathLike) -> tuple[list[TensorInfo], dict]:
    """The tensors of a text GGUF and the metadata the roofline needs."""
    import gguf

    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()

    def val(key: str, default=None):
        f = r.fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()

    meta = {"arch": arch, "n_expert": int(val("expert_count", 1) or 1),
            "n_expert_used": int(val("expert_used_count", 1) or 1), "n_layer": int(val("block_count")),
            "kv_values_per_position": int(val("attention.key_length", 0))}
    infos = [TensorInfo(t.name, tuple(int(x) for x in t.shape), int(t.n_bytes)) for t in r.tensors]
    return infos, meta


# ---------------------------------------------------------------------------------------------------------------
# vision FLOPs (reference doc §5, §6): multiply-adds count 2; softmax, norms, activations, RoPE are not counted

def vision_flops(grid: tuple[int, int], hidden: int, layers: int, intermediate: int, patch: int, merge: int,
                 projection_dim: int) -> int:
    """FLOPs of the matrix products of one image: patch embedding, per layer QKV, scores, weights·V, output
    projection and the MLP, then the 2x2-merged projector."""
    n = grid[0] * grid[1]
    d = hidden
    per_layer = 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * intermediate
    m, dm = n // (merge * merge), d * merge * merge
    projector = 2 * m * dm * dm + 2 * m * dm * projection_dim
    return 2 * n * 3 * patch * patch * d + layers * per_layer + projector


# ---------------------------------------------------------------------------------------------------------------
# child processes

CHILD_CODE = "import sys; from kimivl_edge.bench import child_main; sys.exit(child_main(sys.argv[1:]))"


@dataclass
class Measured:
    """A finished child process: its exit code, wall seconds and peak RSS in bytes.

    ``run_measured`` takes the peak from ``wait4``'s rusage, which Linux never reports below the parent's RSS at the
    time of the fork (the forked copy's high-water mark survives ``exec``): the bench parent stays small for that
    reason, and ``Children.run`` replaces it with the child's own ``VmHWM``."""

    returncode: int
    seconds: float
    peak_rss_bytes: int


def run_measured(cmd: Sequence[str], log: Path, env: dict | None = None) -> Measured:
    """Run ``cmd`` with stdout and stderr appended to ``log``; wall time and the child's own peak RSS."""
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return Measured(p.returncode, seconds, usage.ru_maxrss * 1024)


class Children:
    """Runs bench steps in fresh interpreters (BLAS/OpenMP threads set to ``threads``), logging to one file."""

    def __init__(self, workdir: Path, threads: int):
        self.workdir, self.threads, self.n = workdir, threads, 0
        self.log = workdir / "children.log"
        self.env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                        MKL_NUM_THREADS=str(threads))

    def run(self, task: dict) -> tuple[dict, Measured]:
        self.n += 1
        spec, result = self.workdir / f"task-{self.n}.json", self.workdir / f"result-{self.n}.json"
        spec.write_text(json.dumps(task))
        m = run_measured([sys.executable, "-c", CHILD_CODE, str(spec), str(result)], self.log, self.env)
        if m.returncode != 0 or not result.is_file():
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise KimiVLError(f"bench step {task['kind']} failed (exit code {m.returncode}): {tail[0][:300]} "
                              f"(log: {self.log})")
        data = json.loads(result.read_text())
        spec.unlink()
        result.unlink()
        m.peak_rss_bytes = data["vmhwm_bytes"]  # the child's own high-water mark (see Measured)
        return data, m


def child_main(argv: Sequence[str]) -> int:
    """Entry point of a child: run the task in argv[0] (JSON), write its result (JSON) to argv[1]."""
    task = json.loads(Path(argv[0]).read_text())
    out = CHILD_TASKS[task["kind"]](task)
    out["vmhwm_bytes"] = peak_rss()
    Path(argv[1]).write_text(json.dumps(out))
    return 0


def _task_limits(t: dict) -> dict:
    threads = t["threads"]
    bw = [max(read_bandwidth(t["bandwidth_bytes"], 1), read_bandwidth(t["bandwidth_bytes"], threads))
          for _ in range(t["runs"])]
    return {"bandwidth": bw, "gemm": [gemm_peak(t["gemm_n"]) for _ in range(t["runs"])]}


def _task_synth(t: dict) -> dict:
    from .synth import synth

    t0 = time.perf_counter()
    synth(t["outdir"], t["preset"], "instruct", seed=0, force=True, layers=t["layers"])
    return {"seconds": time.perf_counter() - t0}


def _task_convert(t: dict) -> dict:
    from .convert import convert_checkpoint

    res = convert_checkpoint(t["checkpoint"], t["outtype"], t["mmproj_type"], t["outdir"], threads=t["threads"])
    return {"seconds": res.seconds, "text_path": str(res.text_path), "mmproj_path": str(res.mmproj_path)}


def _task_mmproj(t: dict) -> dict:
    from .convert import plan_conversion
    from .convert.gguf_out import write_gguf

    t0 = time.perf_counter()
    plan = plan_conversion(t["checkpoint"], "bf16", t["mmproj_type"], t["outdir"])
    write_gguf(plan.mmproj_path, plan.mmproj)
    return {"seconds": time.perf_counter() - t0, "mmproj_path": str(plan.mmproj_path)}


def _random_prompts(n_vocab: int, length: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` different random prompts of ordinary (non-special) tokens: no run can reuse another's KV cache."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_vocab - N_SPECIAL, size=length).tolist() for _ in range(count)]


def _timed_runs(once: Callable[[list[int]], tuple[float, float]], prompts: list[list[int]]) -> dict:
    """One warm-up (a short prompt), then one (prefill s, decode s) per prompt."""
    once(prompts[0][:8])
    pre, dec = zip(*(once(p) for p in prompts[1:]))
    return {"prefill_seconds": list(pre), "decode_seconds": list(dec)}


def _ours(t: dict, prompts: list[list[int]]) -> dict:
    """Our runtime: Decoder.prompt for the prefill; SamplerChain.sample + Decoder.append per token (the loop of
    KimiVL.stream_tokens, without its stop-token check so that every run decodes exactly the same count)."""
    from .decoder import Decoder, DecoderSettings
    from .sampling import SamplerChain, SamplingSettings

    dec = Decoder(t["gguf"], DecoderSettings(n_ctx=t["n_ctx"], n_batch=t["n_batch"], n_ubatch=t["n_batch"],
                                             n_threads=t["threads"], kv_type="f16"))
    chain = SamplerChain(SamplingSettings(temperature=0.0).validate())
    n = t["decode_tokens"]

    def once(prompt: list[int]) -> tuple[float, float]:
        dec.reset()
        t0 = time.perf_counter()
        dec.prompt([prompt])
        t1 = time.perf_counter()
        for _ in range(n):
            dec.append(chain.sample(dec.ctx))
        return t1 - t0, time.perf_counter() - t1

    try:
        return _timed_runs(once, prompts)
    finally:
        chain.close()
        dec.close()


def _raw_loop(t: dict, prompts: list[list[int]]) -> dict:
    """The engine alone: llama_batch_get_one + llama_decode over the prompt in n_batch chunks, then a greedy C
    sampler and one llama_decode per token; same model and context parameters as ``Decoder``."""
    import llama_cpp as lc

    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = lc.llama_model_load_from_file(t["gguf"].encode(), mp)
    if not model:
        raise KimiVLError(f"llama.cpp could not load {t['gguf']}")
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = t["n_ctx"], t["n_batch"], t["n_batch"]
    cp.n_threads = cp.n_threads_batch = t["threads"]
    cp.type_k = cp.type_v = 1  # f16, as Decoder's default
    cp.flash_attn_type = 0
    cp.no_perf = True
    ctx = lc.llama_init_from_model(model, cp)
    sp = lc.llama_sampler_chain_default_params()
    sp.no_perf = True
    smpl = lc.llama_sampler_chain_init(sp)
    lc.llama_sampler_chain_add(smpl, lc.llama_sampler_init_greedy())
    mem = lc.llama_get_memory(ctx)
    n, nb = t["decode_tokens"], t["n_batch"]
    one = (lc.llama_token * 1)()

    def decode(batch) -> None:
        if lc.llama_decode(ctx, batch) != 0:
            raise KimiVLError("llama_decode failed in the raw loop")

    def once(prompt: list[int]) -> tuple[float, float]:
        lc.llama_memory_clear(mem, True)
        arr = (lc.llama_token * len(prompt))(*prompt)
        t0 = time.perf_counter()
        for s in range(0, len(prompt), nb):
            ptr = ctypes.cast(ctypes.byref(arr, s * ctypes.sizeof(lc.llama_token)), ctypes.POINTER(lc.llama_token))
            decode(lc.llama_batch_get_one(ptr, min(nb, len(prompt) - s)))
        t1 = time.perf_counter()
        for _ in range(n):
            one[0] = lc.llama_sampler_sample(smpl, ctx, -1)
            decode(lc.llama_batch_get_one(one, 1))
        return t1 - t0, time.perf_counter() - t1

    try:
        return _timed_runs(once, prompts)
    finally:
        lc.llama_sampler_free(smpl)
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def _high_level(t: dict, prompts: list[list[int]]) -> dict:
    """llama-cpp-python's ``Llama.generate`` (greedy): prefill = time to the first token (prompt evaluation plus one
    sample), decode = the next ``decode_tokens`` tokens, each one evaluation plus one sample."""
    from llama_cpp import Llama

    llm = Llama(t["gguf"], n_gpu_layers=0, n_ctx=t["n_ctx"], n_batch=t["n_batch"], n_ubatch=t["n_batch"],
                n_threads=t["threads"], n_threads_batch=t["threads"], flash_attn=False, type_k=1, type_v=1,
                no_perf=True, verbose=False)
    n = t["decode_tokens"]

    def once(prompt: list[int]) -> tuple[float, float]:
        llm.reset()
        gen = llm.generate(prompt, temp=0.0, reset=True)
        t0 = time.perf_counter()
        next(gen)
        t1 = time.perf_counter()
        for _ in range(n):
            next(gen)
        t2 = time.perf_counter()
        gen.close()
        return t1 - t0, t2 - t1

    try:
        return _timed_runs(once, prompts)
    finally:
        llm.close()


def _task_decode(t: dict) -> dict:
    """One method on one text GGUF (a child per method, so each peak RSS is its own)."""
    import llama_cpp as lc

    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    model = lc.llama_model_load_from_file(t["gguf"].encode(), mp)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    lc.llama_model_free(model)
    prompts = _random_prompts(n_vocab, t["prompt_tokens"], t["runs"] + 1)
    fn = {"kimivl_edge": _ours, "llama_decode_loop": _raw_loop, "llama_cpp_python": _high_level}[t["method"]]
    return fn(t, prompts)


def _noise_image(size: tuple[int, int], seed: int):
    """A deterministic RGB noise image of ``size`` (w, h): content does not change the compute, only the pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _task_vision(t: dict) -> dict:
    from .image import preprocess
    from .mmproj import MmprojFile

    mm = MmprojFile(t["mmproj"])
    cfg = mm.image_processor_config()
    hp = mm.hparams
    out: dict = {"hparams": {"hidden": hp.hidden_size, "layers": hp.num_layers, "intermediate": hp.intermediate_size,
                             "patch": hp.patch_size, "merge": hp.merge_size, "projection_dim": hp.projection_dim}}
    try:
        if t["backend"] == "ggml":
            from .vision_ggml import GgmlVisionEncoder

            enc = GgmlVisionEncoder(mm, threads=t["threads"])
        else:
            from .vision import VisionEncoder

            enc = VisionEncoder(mm, weight_cache=t["backend"] == "numpy-cached", threads=t["threads"])
    except (KimiVLError, OSError, ImportError) as e:
        return out | {"available": False, "error": " ".join(str(e).split())[:300], "items": []}
    inputs = [preprocess(_noise_image(tuple(s), i), cfg) for i, s in enumerate(t["sizes"])]
    t0 = time.perf_counter()
    enc.encode(*inputs[0])  # warm-up; for numpy-cached this fills the weight cache
    warmup = time.perf_counter() - t0
    items = []
    for size, (pv, grid) in zip(t["sizes"], inputs):
        secs = []
        for _ in range(t["runs"]):
            t0 = time.perf_counter()
            enc.encode(pv, grid)
            secs.append(time.perf_counter() - t0)
        items.append({"image": f"{size[0]}x{size[1]}", "grid": [int(g) for g in grid[0]], "seconds": secs,
                      "peak_rss_bytes": peak_rss()})
    return out | {"available": True, "error": None, "warmup_seconds": warmup, "items": items}


def _task_ttft(t: dict) -> dict:
    """KimiVL loaded as a chat would (default context); per run a new image (so nothing is cached), the KV cache
    cleared, and the time until the first generated token; then a follow-up question about the same image."""
    from .model import KimiVL, Stats

    t0 = time.perf_counter()
    model = KimiVL.load(t["text"], t["mmproj"], n_threads=t["threads"])
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss()
    res: dict = {"load_seconds": load_s, "rss_after_load_bytes": rss_loaded, "ttft": [], "encode": [],
                 "prefill": [], "followup": [], "followup_evaluated": [], "n_ctx": model.decoder.n_ctx}
    for r in range(t["runs"] + 1):   # run 0 is a warm-up
        model.decoder.reset()
        msgs = [{"role": "user", "content": [{"type": "image", "image": _noise_image(tuple(t["image"]), 1000 + r)},
                                             {"type": "text", "text": TTFT_QUESTION}]}]
        st = Stats()
        t0 = time.perf_counter()
        it = model.stream_tokens(msgs, stats=st, temperature=0.0, max_tokens=8)
        first = next(it, None)
        ttft = time.perf_counter() - t0
        rest = list(it)
        answer = model.detokenize(([first] if first is not None else []) + rest) or "."
        follow = msgs + [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOWUP_QUESTION}]
        st2 = Stats()
        t0 = time.perf_counter()
        it = model.stream_tokens(follow, stats=st2, temperature=0.0, max_tokens=1)
        next(it, None)
        followup = time.perf_counter() - t0
        it.close()
        if r == 0:
            continue
        res["ttft"].append(ttft)
        res["encode"].append(st.encode_seconds)
        res["prefill"].append(st.prefill_seconds)
        res["followup"].append(followup)
        res["followup_evaluated"].append(st2.evaluated_tokens)
        res["image_tokens"], res["prompt_tokens"] = st.image_tokens, st.prompt_tokens
    model.close()
    return res


CHILD_TASKS: dict[str, Callable[[dict], dict]] = {
    "limits": _task_limits, "synth": _task_synth, "convert": _task_convert, "mmproj": _task_mmproj,
    "decode": _task_decode, "vision": _task_vision, "ttft": _task_ttft,
}


# ---------------------------------------------------------------------------------------------------------------
# the benchmark

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


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _scale_note(preset: str, layers: int | None) -> str:
    from .config import PRESET_DIMS

    dims = PRESET_DIMS[preset]
    full = f"{dims['text']['num_hidden_layers']} text / {dims['vision']['num_hidden_layers']} vision layers"
    if layers is None:
        note = f"full depth ({full})"
    else:
        note = (f"SCALED: --layers {layers}: {layers} text and {layers} vision layers instead of {full}; every other "
                "dimension is the preset's. Per-layer costs are real, totals are not the full model's, and "
                "llama.cpp's Q4_K_M mix (which picks types by layer index) differs from the full model's")
    if preset == "tiny":
        note += "; tiny preset: test-model dimensions, not Kimi-VL's (a smoke run, not a performance figure)"
    return note


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def gguf_disk_peak(ckpt: Path, gguf_dir: Path, llama_convert: bool) -> int:
    """Peak bytes in ``gguf_dir`` during the conversions, in ``CONVERT_ORDER``: the files already written plus the
    current step's outputs (every conversion is one pass, no intermediate file)."""
    from .convert import plan_conversion

    held = peak = 0
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
    from .checkpoint import hf_tensor_specs
    from .config import KimiVLConfig
    from .synth import scaled_config_dict

    specs = hf_tensor_specs(KimiVLConfig.from_dict(scaled_config_dict(preset, "instruct", layers)))
    return sum(2 * math.prod(s.shape) for s in specs)


# Before the checkpoint exists, the GGUF peak is estimated as this multiple of its size (the Q4_K_M step holds a
# BF16 copy of the text model plus the Q4_K_M file: 1.33x on the a3b dimensions); the exact check follows synth.
GGUF_PEAK_ESTIMATE = 1.4


def _check_disk(need: int, where: Path) -> None:
    """Refuse early (one line) when ``need`` bytes do not fit in ``where``."""
    free = shutil.disk_usage(where).free
    if need > free:
        raise UsageError(f"the benchmark needs up to {need / 1e9:.1f} GB in {where}, {free / 1e9:.1f} GB free: pass "
                         "--layers N to scale the model down")


def _conversions(o: BenchOptions, ch: Children, ckpt: Path, gguf_dir: Path, ckpt_bytes: int, read: dict,
                 res: dict) -> dict[str, Path]:
    """Section 1. Returns the GGUF paths: text q8_0 / q4_k_m, mmproj f16 / q8_0 / q4_0."""
    paths: dict[str, Path] = {}
    for outtype in CONVERT_ORDER:
        secs, rss = [], []
        for r in range(o.runs):
            _say(f"convert -> {outtype.upper()} text + {MMPROJ_FOR_TEXT[outtype].upper()} mmproj, run {r + 1}/{o.runs}")
            data, m = ch.run({"kind": "convert", "checkpoint": str(ckpt), "outtype": outtype,
                              "mmproj_type": MMPROJ_FOR_TEXT[outtype], "outdir": str(gguf_dir), "threads": ch.threads})
            secs.append(data["seconds"])
            rss.append(m.peak_rss_bytes)
        paths[outtype] = Path(data["text_path"])
        paths["mmproj_" + MMPROJ_FOR_TEXT[outtype]] = Path(data["mmproj_path"])
        res[outtype] = {
            "text_type": outtype, "mmproj_type": MMPROJ_FOR_TEXT[outtype],
            "text_bytes": paths[outtype].stat().st_size,
            "mmproj_bytes": paths["mmproj_" + MMPROJ_FOR_TEXT[outtype]].stat().st_size,
            "seconds": summarize(secs), "peak_rss_bytes": summarize(rss),
            "input_bytes_per_s": summarize([ckpt_bytes / s for s in secs]),
            "fraction_of_raw_read": _ratio(read["seconds"]["median"], statistics.median(secs)),
        }
    secs, rss = [], []
    for r in range(o.runs):
        _say(f"convert -> F16 mmproj only, run {r + 1}/{o.runs}")
        data, m = ch.run({"kind": "mmproj", "checkpoint": str(ckpt), "mmproj_type": "f16", "outdir": str(gguf_dir)})
        secs.append(data["seconds"])
        rss.append(m.peak_rss_bytes)
    paths["mmproj_f16"] = Path(data["mmproj_path"])
    res["mmproj_f16"] = {"mmproj_type": "f16", "mmproj_bytes": paths["mmproj_f16"].stat().st_size,
                         "seconds": summarize(secs), "peak_rss_bytes": summarize(rss)}
    res["llama_convert"] = _llama_convert(o, ch, ckpt, gguf_dir, ckpt_bytes)
    return paths


def _llama_convert(o: BenchOptions, ch: Children, ckpt: Path, gguf_dir: Path, ckpt_bytes: int) -> dict:
    """llama.cpp's own converter on the same checkpoint (only when the user gives its path; never downloaded)."""
    if o.llama_convert is None:
        return {"measured": False, "reason": "no --llama-convert PATH given"}
    out = gguf_dir / "llama-convert-Q8_0.gguf"
    secs, rss = [], []
    for r in range(o.runs):
        _say(f"llama.cpp convert_hf_to_gguf.py -> Q8_0, run {r + 1}/{o.runs}")
        m = run_measured([sys.executable, str(o.llama_convert), str(ckpt), "--outtype", "q8_0", "--outfile",
                          str(out)], ch.log, ch.env)
        if m.returncode != 0:
            tail = ch.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            return {"measured": False, "reason": f"exit code {m.returncode}: {tail[0][:300]}"}
        secs.append(m.seconds)
        rss.append(m.peak_rss_bytes)
    size = out.stat().st_size
    out.unlink()
    return {"measured": True, "script": str(o.llama_convert), "text_bytes": size, "seconds": summarize(secs),
            "peak_rss_bytes": summarize(rss), "input_bytes_per_s": summarize([ckpt_bytes / s for s in secs]),
            "peak_rss_note": f"wait4 rusage of the script's process, never below the bench's own RSS at the fork "
                             f"({current_rss() / 1e6:.0f} MB)"}


def _decode(o: BenchOptions, ch: Children, gguf: Path) -> dict:
    """Section 2 for one text GGUF."""
    n_ctx = -(-(PROMPT_TOKENS + o.decode_tokens + 8) // 256) * 256
    base = {"gguf": str(gguf), "n_ctx": n_ctx, "n_batch": PROMPT_TOKENS, "threads": ch.threads,
            "prompt_tokens": PROMPT_TOKENS, "decode_tokens": o.decode_tokens, "runs": o.runs}
    methods = {}
    for method in DECODE_METHODS:
        _say(f"prefill + decode, {gguf.name}, {method}")
        data, m = ch.run(dict(base, kind="decode", method=method))
        methods[method] = {
            "prefill_tokens_per_s": summarize([PROMPT_TOKENS / s for s in data["prefill_seconds"]]),
            "decode_tokens_per_s": summarize([o.decode_tokens / s for s in data["decode_seconds"]]),
            "peak_rss_bytes": m.peak_rss_bytes,
        }
    raw = methods["llama_decode_loop"]
    return {
        "gguf_bytes": gguf.stat().st_size, "n_ctx": n_ctx, "n_batch": PROMPT_TOKENS, "prompt_tokens": PROMPT_TOKENS,
        "decode_tokens": o.decode_tokens, "methods": methods,
        "decode_vs_raw_loop": {k: _ratio(v["decode_tokens_per_s"]["median"], raw["decode_tokens_per_s"]["median"])
                               for k, v in methods.items()},
        "prefill_vs_raw_loop": {k: _ratio(v["prefill_tokens_per_s"]["median"], raw["prefill_tokens_per_s"]["median"])
                                for k, v in methods.items()},
    }


def _edge_vs_llama(decode: dict) -> dict:
    """Issue 8's recipe target: our runtime on our Q4_K_EDGE file vs llama.cpp (raw llama_decode loop and
    llama-cpp-python) on llama.cpp's own Q4_K_M recipe, decode tokens/s."""
    ours = decode["q4_k_edge"]["methods"]["kimivl_edge"]["decode_tokens_per_s"]["median"]
    theirs = decode["q4_k_m"]["methods"]
    return {k: _ratio(ours, theirs[k]["decode_tokens_per_s"]["median"]) for k in ("llama_decode_loop", "llama_cpp_python")}


def _roofline(gguf: Path, decode: dict, bandwidth: float) -> dict:
    """Section 3 for one text GGUF: the ceiling reads weights + the KV cache at the mean decode position."""
    infos, meta = gguf_tensor_infos(gguf)
    bpt = bytes_per_token(infos, meta["n_expert"], meta["n_expert_used"])
    mean_pos = decode["prompt_tokens"] + decode["decode_tokens"] / 2
    kv = kv_bytes_per_token(meta["n_layer"], int(mean_pos), meta["kv_values_per_position"])
    ceiling = bandwidth / (bpt["total"] + kv)
    achieved = {k: v["decode_tokens_per_s"]["median"] for k, v in decode["methods"].items()}
    return {"bytes_per_token": bpt, "kv_bytes_per_token": kv, "kv_note": f"f16 cache, {meta['n_layer']} layers x "
            f"{int(mean_pos)} positions x {meta['kv_values_per_position']} values (mean decode position)",
            "read_bandwidth_bytes_per_s": bandwidth, "ceiling_tokens_per_s": ceiling,
            "achieved_tokens_per_s": achieved,
            "fraction_of_ceiling": {k: v / ceiling for k, v in achieved.items()}}


def _vision(o: BenchOptions, ch: Children, paths: dict[str, Path], gemm: float) -> dict:
    """Section 4: one child per (mmproj type, backend), image sizes in increasing order."""
    sizes = VISION_SIZES[o.preset]
    note = ("sizes are before the processor's resize (grid = patches after it); peak RSS per size is the process's "
            "VmHWM after that size (sizes run in increasing order, after one warm-up encode of the smallest)")
    if o.preset == "tiny":
        note += "; tiny preset: 448x448 and 640x360 only, to stay quick (a3b: 448x448, 896x896, 1920x1080)"
    results, hparams = [], None
    for mt in MMPROJ_TYPES:
        mmproj = paths["mmproj_" + mt]
        for backend in VISION_BACKENDS:
            _say(f"vision encode, {mmproj.name}, {backend}")
            data, _ = ch.run({"kind": "vision", "mmproj": str(mmproj), "backend": backend, "sizes": sizes,
                              "runs": o.runs, "threads": ch.threads})
            hparams = data["hparams"]
            items = []
            for it in data["items"]:
                flops = vision_flops(tuple(it["grid"]), **hparams)
                sec = summarize(it["seconds"])
                items.append({"image": it["image"], "grid": it["grid"], "patches": it["grid"][0] * it["grid"][1],
                              "tokens": it["grid"][0] * it["grid"][1] // hparams["merge"] ** 2, "gflop": flops / 1e9,
                              "seconds": sec, "gflop_per_s": flops / 1e9 / sec["median"],
                              "fraction_of_gemm_peak": flops / sec["median"] / gemm,
                              "peak_rss_bytes": it["peak_rss_bytes"]})
            results.append({"mmproj_type": mt, "backend": backend, "available": data["available"],
                            "error": data["error"], "mmproj_bytes": mmproj.stat().st_size,
                            "warmup_seconds": data.get("warmup_seconds"), "items": items})
    return {"sizes": [f"{w}x{h}" for w, h in sizes], "note": note, "gemm_flops_per_s": gemm, "hparams": hparams,
            "results": results}


def _ttft(o: BenchOptions, ch: Children, text: Path, mmproj: Path) -> dict:
    """Section 5 with the Q4_K_M text GGUF and the Q8_0 mmproj, numpy vision backend (the chat defaults)."""
    _say(f"time to first token, {text.name} + {mmproj.name}")
    data, m = ch.run({"kind": "ttft", "text": str(text), "mmproj": str(mmproj), "threads": ch.threads,
                      "runs": o.runs, "image": list(TTFT_IMAGE)})
    infos, meta = gguf_tensor_infos(text)
    kv = kv_bytes_per_token(meta["n_layer"], data["n_ctx"], meta["kv_values_per_position"])
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


def run_bench(o: BenchOptions, command: str = "kimivl-edge bench") -> dict:
    """Run every section and return the bench.json dictionary (files are written by ``write_outputs``)."""
    from .config import PRESETS

    if o.preset not in PRESETS:
        raise UsageError(f"unknown preset {o.preset!r} (choose from {', '.join(PRESETS)})")
    if o.layers is not None and o.layers < 2:
        raise UsageError("--layers must be >= 2 (layer 0 is dense; the MoE layers start at 1)")
    if o.runs < 1:
        raise UsageError("--runs must be >= 1")
    if o.llama_convert is not None and not o.llama_convert.is_file():
        raise UsageError(f"--llama-convert {o.llama_convert}: no such file")
    threads = o.threads or os.cpu_count() or 1
    started, t_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    work = o.out / "bench-work"
    if work.exists():
        shutil.rmtree(work)
    gguf_dir = work / "gguf"
    gguf_dir.mkdir(parents=True)
    ch = Children(work, threads)
    res: dict = {"schema": 1, "command": command, "preset": o.preset, "layers": o.layers,
                 "scaled": o.layers is not None, "scale_note": _scale_note(o.preset, o.layers), "runs": o.runs,
                 "threads": threads, "started": started, "machine": machine_info()}
    try:
        _say("machine limits: read bandwidth, GEMM peak")
        lim, _ = ch.run({"kind": "limits", "threads": threads, "runs": o.runs, "bandwidth_bytes": BANDWIDTH_BYTES,
                         "gemm_n": GEMM_N})
        res["limits"] = {
            "read_bandwidth_bytes_per_s": summarize(lim["bandwidth"]),
            "read_bandwidth_method": BANDWIDTH_METHOD.format(size=f"{BANDWIDTH_BYTES >> 20} MiB", threads=threads),
            "gemm_flops_per_s": summarize(lim["gemm"]), "gemm_method": GEMM_METHOD.format(n=GEMM_N, threads=threads)}
        bandwidth = res["limits"]["read_bandwidth_bytes_per_s"]["median"]
        gemm = res["limits"]["gemm_flops_per_s"]["median"]

        ckpt = work / "checkpoint"
        est = synth_bytes(o.preset, o.layers)
        _check_disk(int(est * (1 + GGUF_PEAK_ESTIMATE)), gguf_dir)
        _say(f"synth --preset {o.preset}" + (f" --layers {o.layers}" if o.layers else "") + f" -> {ckpt}")
        data, m = ch.run({"kind": "synth", "outdir": str(ckpt), "preset": o.preset, "layers": o.layers})
        files = _checkpoint_files(ckpt)
        ckpt_bytes = sum(f.stat().st_size for f in files)
        cfg = json.loads((ckpt / "config.json").read_text())
        res["checkpoint"] = {"preset": o.preset, "text_layers": cfg["text_config"]["num_hidden_layers"],
                             "vision_layers": cfg["vision_config"]["num_hidden_layers"], "bytes": ckpt_bytes,
                             "files": len(files), "synth_seconds": data["seconds"],
                             "synth_peak_rss_bytes": m.peak_rss_bytes}
        res["checkpoint"]["gguf_disk_peak_bytes"] = need = gguf_disk_peak(ckpt, gguf_dir, o.llama_convert is not None)
        _check_disk(need, gguf_dir)

        _say("raw read of the safetensors files")
        reads = [raw_read_seconds(files) for _ in range(o.runs)]
        ram = res["machine"]["ram_bytes"]
        cache = (f"page cache not dropped: the {ckpt_bytes / 1e9:.2f} GB checkpoint was just written and fits in "
                 f"RAM ({ram / 1e9:.1f} GB), so these reads (and the conversions') likely come from memory: an "
                 "upper bound of the disk" if ckpt_bytes < 0.5 * ram else
                 f"page cache not dropped: the {ckpt_bytes / 1e9:.1f} GB checkpoint is larger than half the RAM "
                 f"({ram / 1e9:.1f} GB), so most reads come from the disk")
        conv: dict = {"raw_read": {"bytes": ckpt_bytes, "seconds": summarize(reads),
                                   "bytes_per_s": summarize([ckpt_bytes / s for s in reads]), "page_cache_note": cache}}
        res["conversion"] = conv
        paths = _conversions(o, ch, ckpt, gguf_dir, ckpt_bytes, conv["raw_read"], conv)
        if not o.keep:
            shutil.rmtree(ckpt)

        res["decode"] = {tt: _decode(o, ch, paths[tt]) for tt in TEXT_TYPES}
        res["decode"]["edge_vs_llama_q4_k_m"] = _edge_vs_llama(res["decode"])
        res["roofline"] = {tt: _roofline(paths[tt], res["decode"][tt], bandwidth) for tt in TEXT_TYPES}
        res["vision"] = _vision(o, ch, paths, gemm)
        res["ttft"] = _ttft(o, ch, paths["q4_k_m"], paths["mmproj_q8_0"])
    finally:
        if not o.keep and work.exists():
            shutil.rmtree(work / "checkpoint", ignore_errors=True)
            shutil.rmtree(gguf_dir, ignore_errors=True)
    res["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["not_measured"] = _not_measured(o, res)
    res["total_seconds"] = time.perf_counter() - t_start
    return res


def _not_measured(o: BenchOptions, res: dict) -> list[str]:
    out = []
    if not res["conversion"]["llama_convert"].get("measured"):
        out.append("llama.cpp's convert_hf_to_gguf.py: " + res["conversion"]["llama_convert"]["reason"])
    for r in res["vision"]["results"]:
        if not r["available"]:
            out.append(f"vision {r['backend']} on {r['mmproj_type'].upper()}: {r['error']}")
    out.append("llama.cpp's own vision encoder timed through llama-mtmd-cli (the ggml rows use the same clip graph "
               "through our binding)")
    out.append("cold-cache disk reads (the page cache is not dropped; see conversion.raw_read.page_cache_note)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# markdown

def _fmt(stat: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """``median (min–max)`` of a summarize() dict, divided by ``scale``."""
    if stat is None:
        return "–"
    f = lambda x: f"{x / scale:.{digits}f}"  # noqa: E731
    if stat["min"] == stat["max"]:
        return f(stat["median"])
    return f"{f(stat['median'])} ({f(stat['min'])}–{f(stat['max'])})"


def _gb(n: float | None) -> str:
    return "–" if n is None else (f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB")


def _load(avg: list[float] | None) -> str:
    return "?" if not avg else f"{avg[0]:.2f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def render_markdown(r: dict) -> str:
    """bench.md from the bench.json dictionary."""
    m, lim = r["machine"], r["limits"]
    lines = [f"# kimivl-edge bench: {r['preset']}" + (f", --layers {r['layers']}" if r["scaled"] else ""), "",
             f"Command: `{r['command']}`  ", f"Started {r['started']}, {r['total_seconds']:.0f} s in all; "
             f"{r['runs']} run(s) per figure: median (min–max); {r['threads']} thread(s).  ",
             f"Machine: {m['cpu_model']} (family {m['cpu_family']}, model {m['cpu_model_number']}; "
             f"{', '.join(m['cpu_flags'])}), {m['logical_cpus']} logical CPUs, {m['ram_bytes'] / 2**30:.1f} GiB RAM, "
             f"{m['os']}, Python {m['python']}, numpy {m['numpy']}, llama-cpp-python {m['llama_cpp_python']}.  ",
             f"Load average (1 min) before the run: {_load(m['load_average'])} (well above 0: other processes were "
             "sharing the CPUs, so the figures are pessimistic and noisy).  ",
             f"Model: {r['scale_note']}.", "",
             f"Machine limits: read bandwidth {_fmt(lim['read_bandwidth_bytes_per_s'], 1e9, 1)} GB/s; float32 GEMM "
             f"peak {_fmt(lim['gemm_flops_per_s'], 1e9, 1)} GFLOP/s.", ""]
    c, ck = r["conversion"], r["checkpoint"]
    lines += ["## 1. Conversion", "",
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
    lines += ["", "## 2. Prefill and decode", ""]
    lines += ["| text GGUF | runtime | prefill tok/s (512 tokens) | decode tok/s | decode vs raw loop | "
              "prefill vs raw loop | peak RSS GB |", "|---|---|---|---|---|---|---|"]
    names = {"kimivl_edge": "kimivl-edge (Decoder + SamplerChain)", "llama_decode_loop": "raw llama_decode loop",
             "llama_cpp_python": "llama-cpp-python Llama.generate"}
    for tt in TEXT_TYPES:
        d = r["decode"][tt]
        for k, v in d["methods"].items():
            lines.append(f"| {tt.upper()} ({_gb(d['gguf_bytes'])}) | {names[k]} | "
                         f"{_fmt(v['prefill_tokens_per_s'], 1, 1)} | {_fmt(v['decode_tokens_per_s'], 1, 1)} | "
                         f"{_pct(d['decode_vs_raw_loop'][k])} | "
                         f"{_pct(d['prefill_vs_raw_loop'][k])} | {v['peak_rss_bytes'] / 1e9:.2f} |")
    ev = r["decode"]["edge_vs_llama_q4_k_m"]
    lines += ["", f"Our runtime on Q4_K_EDGE vs llama.cpp on its Q4_K_M, decode: {_pct(ev['llama_decode_loop'])} of the raw "
              f"llama_decode loop, {_pct(ev['llama_cpp_python'])} of llama-cpp-python."]
    d0 = r["decode"][TEXT_TYPES[0]]
    lines += ["", f"Context {d0['n_ctx']}, batch {d0['n_batch']}, f16 KV cache, no flash attention, greedy; each run: "
              f"a new random {d0['prompt_tokens']}-token prompt, then {d0['decode_tokens']} decoded tokens.", ""]
    lines += ["## 3. Roofline (decode)", "",
              "| text GGUF | weights/token | of which routed experts | attention | head | KV/token | ceiling tok/s | "
              "kimivl-edge | raw loop | llama-cpp-python |", "|---|---|---|---|---|---|---|---|---|---|"]
    for tt in TEXT_TYPES:
        f = r["roofline"][tt]
        b, fr = f["bytes_per_token"], f["fraction_of_ceiling"]
        lines.append(f"| {tt.upper()} | {_gb(b['total'])} | {_gb(b['routed_experts'])} | {_gb(b['attention'])} | "
                     f"{_gb(b['head'])} | {_gb(f['kv_bytes_per_token'])} | {f['ceiling_tokens_per_s']:.1f} | "
                     f"{_pct(fr['kimivl_edge'])} | {_pct(fr['llama_decode_loop'])} | {_pct(fr['llama_cpp_python'])} |")
    lines += ["", f"Ceiling = read bandwidth / (weight bytes + KV bytes per token); the last three columns are "
              f"achieved / ceiling. Bandwidth method: {lim['read_bandwidth_method']}.", ""]
    v = r["vision"]
    lines += ["## 4. Vision encode", "", f"Note: {v['note']}. GFLOP counts the matrix products only; % of the "
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
    t = r["ttft"]
    lines += ["", "## 5. Time to first token and memory", "",
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
    lines += ["## Not measured", ""] + [f"- {s}" for s in r["not_measured"]] + [""]
    return "\n".join(lines)


def write_outputs(r: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, md = out / "bench.json", out / "bench.md"
    j.write_text(json.dumps(r, indent=2) + "\n")
    md.write_text(render_markdown(r))
    return md, j


def main(argv: list[str] | None = None) -> int:
    from .cli import OneLineParser

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
