"""The measured steps, each run in a child process (``harness.child_main``): a task is a JSON dictionary whose
``kind`` picks the function in ``CHILD_TASKS``; what it returns (raw seconds, RSS) is summarized by the parent."""
from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from ..tokenizer import N_SPECIAL
from ..decoder import LOAD_MODE_MMAP, LOAD_MODE_NONE, model_params
from ..errors import KimiVLError
from .media import task_media
from .probes import current_rss, gemm_peak, peak_rss, read_bandwidth
from .server import task_server

KV_TYPE = GGMLQuantizationType.F16  # every engine's KV cache, as Decoder's default
WARMUP_PROMPT_TOKENS = 8

Prompts = list[list[int]]
Once = Callable[[list[int]], tuple[float, float]]  # one prompt -> (prefill s, decode s)


# ---------------------------------------------------------------------------------------------------------------
# machine limits, checkpoint, conversion

def task_limits(t: dict) -> dict:
    threads = t["threads"]
    bw = [max(read_bandwidth(t["bandwidth_bytes"], 1), read_bandwidth(t["bandwidth_bytes"], threads))
          for _ in range(t["runs"])]
    return {"bandwidth": bw, "gemm": [gemm_peak(t["gemm_n"]) for _ in range(t["runs"])]}


def task_synth(t: dict) -> dict:
    from ..synth import synth

    t0 = time.perf_counter()
    synth(t["outdir"], t["preset"], "instruct", seed=0, force=True, layers=t["layers"])
    return {"seconds": time.perf_counter() - t0}


def task_convert(t: dict) -> dict:
    from ..convert import convert_checkpoint

    res = convert_checkpoint(t["checkpoint"], t["outtype"], t["mmproj_type"], t["outdir"], threads=t["threads"])
    return {"seconds": res.seconds, "text_path": str(res.text_path), "mmproj_path": str(res.mmproj_path)}


def task_mmproj(t: dict) -> dict:
    from ..convert import plan_conversion
    from ..convert.gguf_out import write_gguf

    t0 = time.perf_counter()
    plan = plan_conversion(t["checkpoint"], "bf16", t["mmproj_type"], t["outdir"])
    write_gguf(plan.mmproj_path, plan.mmproj)
    return {"seconds": time.perf_counter() - t0, "mmproj_path": str(plan.mmproj_path)}


# ---------------------------------------------------------------------------------------------------------------
# prefill and decode: one method on one text GGUF

def _random_prompts(n_vocab: int, length: int, count: int, seed: int = 0) -> Prompts:
    """``count`` different random prompts of ordinary (non-special) tokens: no run can reuse another's KV cache."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_vocab - N_SPECIAL, size=length).tolist() for _ in range(count)]


def _timed_runs(once: Once, prompts: Prompts) -> dict:
    """One warm-up (a short prompt), then one (prefill s, decode s) per prompt."""
    once(prompts[0][:WARMUP_PROMPT_TOKENS])
    pre, dec = zip(*(once(p) for p in prompts[1:]))
    return {"prefill_seconds": list(pre), "decode_seconds": list(dec)}


def _our_decoder(t: dict) -> Any:
    """Our ``Decoder`` with the task's context, threads and load mode (``mmap``: None = its auto rule)."""
    from ..decoder import Decoder, DecoderSettings

    return Decoder(t["gguf"], DecoderSettings(n_ctx=t["n_ctx"], n_batch=t["n_batch"], n_ubatch=t["n_batch"],
                                              n_threads=t["threads"], kv_type=KV_TYPE.name.lower(),
                                              mmap=t.get("mmap"), repack=t.get("repack", True)))


def _our_loop(dec: Any, t: dict, prompts: Prompts) -> dict:
    """Our runtime's loop: Decoder.prefill; SamplerChain.sample + Decoder.append per token (the loop of
    KimiVL.stream_tokens, without its stop-token check so that every run decodes exactly the same count); and the
    load mode the decoder used."""
    from ..sampling import SamplerChain, SamplingSettings

    chain = SamplerChain(SamplingSettings(temperature=0.0).validate())
    n = t["decode_tokens"]

    def once(prompt: list[int]) -> tuple[float, float]:
        dec.reset()
        t0 = time.perf_counter()
        dec.prefill([prompt])
        t1 = time.perf_counter()
        for _ in range(n):
            dec.append(chain.sample(dec.ctx))
        return t1 - t0, time.perf_counter() - t1

    try:
        return _timed_runs(once, prompts) | {"mmap": dec.mmap, "repack": dec.repack}
    finally:
        chain.close()


def _ours(t: dict, prompts: Prompts) -> dict:
    dec = _our_decoder(t)
    try:
        return _our_loop(dec, t, prompts)
    finally:
        dec.close()


class _RawEngine:
    """llama.cpp alone: a model loaded in the task's mode (``mmap``, ``repack``), a context with ``Decoder``'s
    parameters and a greedy C sampler."""

    def __init__(self, t: dict):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = model_params(t["repack"])
        mp.load_mode = LOAD_MODE_MMAP if t["mmap"] else LOAD_MODE_NONE
        self.model = lc.llama_model_load_from_file(t["gguf"].encode(), mp)
        if not self.model:
            raise KimiVLError(f"llama.cpp could not load {t['gguf']}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = t["n_ctx"], t["n_batch"], t["n_batch"]
        cp.n_threads = cp.n_threads_batch = t["threads"]
        cp.type_k = cp.type_v = int(KV_TYPE)
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        sp = lc.llama_sampler_chain_default_params()
        sp.no_perf = True
        self.smpl = lc.llama_sampler_chain_init(sp)
        lc.llama_sampler_chain_add(self.smpl, lc.llama_sampler_init_greedy())
        self.mem = lc.llama_get_memory(self.ctx)

    def decode(self, batch: Any) -> None:
        if self.lc.llama_decode(self.ctx, batch) != 0:
            raise KimiVLError("llama_decode failed in the raw loop")

    def tokens(self, prompt: list[int]) -> Any:
        """The prompt as a C ``llama_token`` array."""
        return (self.lc.llama_token * len(prompt))(*prompt)

    def prefill(self, arr: Any, n_batch: int) -> None:
        """The token array ``arr`` in ``n_batch`` chunks, each one llama_batch_get_one + llama_decode."""
        lc, n = self.lc, len(arr)
        for s in range(0, n, n_batch):
            ptr = ctypes.cast(ctypes.byref(arr, s * ctypes.sizeof(lc.llama_token)), ctypes.POINTER(lc.llama_token))
            self.decode(lc.llama_batch_get_one(ptr, min(n_batch, n - s)))

    def close(self) -> None:
        self.lc.llama_sampler_free(self.smpl)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def _raw_loop(t: dict, prompts: Prompts) -> dict:
    """The engine alone: llama_batch_get_one + llama_decode over the prompt in n_batch chunks, then a greedy C
    sampler and one llama_decode per token; same model and context parameters as ``Decoder``."""
    eng = _RawEngine(t)
    lc = eng.lc
    n, nb = t["decode_tokens"], t["n_batch"]
    one = (lc.llama_token * 1)()

    def once(prompt: list[int]) -> tuple[float, float]:
        lc.llama_memory_clear(eng.mem, True)
        arr = eng.tokens(prompt)
        t0 = time.perf_counter()
        eng.prefill(arr, nb)
        t1 = time.perf_counter()
        for _ in range(n):
            one[0] = lc.llama_sampler_sample(eng.smpl, eng.ctx, -1)
            eng.decode(lc.llama_batch_get_one(one, 1))
        return t1 - t0, time.perf_counter() - t1

    try:
        return _timed_runs(once, prompts)
    finally:
        eng.close()


def _high_level(t: dict, prompts: Prompts) -> dict:
    """llama-cpp-python's ``Llama.generate`` (greedy): prefill = time to the first token (prompt evaluation plus one
    sample), decode = the next ``decode_tokens`` tokens, each one evaluation plus one sample."""
    import llama_cpp.llama as high

    # Llama has no option for llama.cpp's extra buffers: its defaults come from the same call (an AMX CPU aborts)
    high.llama_cpp.llama_model_default_params = lambda: model_params(t["repack"])
    llm = high.Llama(t["gguf"], use_mmap=t["mmap"], n_gpu_layers=0, n_ctx=t["n_ctx"], n_batch=t["n_batch"],
                     n_ubatch=t["n_batch"], n_threads=t["threads"], n_threads_batch=t["threads"], flash_attn=False,
                     type_k=int(KV_TYPE), type_v=int(KV_TYPE), no_perf=True, verbose=False)
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


DECODE_METHODS: dict[str, Callable[[dict, Prompts], dict]] = {
    "kimivl_edge": _ours, "llama_decode_loop": _raw_loop, "llama_cpp_python": _high_level}


def _n_vocab(gguf: str) -> int:
    """The vocabulary size, as llama.cpp reads it (vocabulary-only load)."""
    import llama_cpp as lc

    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    model = lc.llama_model_load_from_file(gguf.encode(), mp)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    lc.llama_model_free(model)
    return int(n_vocab)


def task_decode(t: dict) -> dict:
    """One method on one text GGUF (a child per method, so each peak RSS is its own)."""
    prompts = _random_prompts(_n_vocab(t["gguf"]), t["prompt_tokens"], t["runs"] + 1)
    return {"mmap": t["mmap"], "repack": t["repack"]} | DECODE_METHODS[t["method"]](t, prompts)


def task_system_info(t: dict) -> dict:
    """llama.cpp's CPU features here, whether its extra (repacked) weight buffers are safe for deepseek2, and the
    load mode ``Decoder``'s auto rule picks for ``t["gguf"]`` (mmap unless llama.cpp repacks its weights)."""
    import llama_cpp as lc

    from ..decoder import extra_buffers_safe, repacked_tensors

    lc.llama_backend_init()
    info = lc.llama_print_system_info().decode("utf-8", "replace")
    safe = extra_buffers_safe(info)
    return {"system_info": info.strip(), "extra_buffers_safe": safe,
            "auto_mmap": not (safe and bool(repacked_tensors(t["gguf"]))), "auto_repack": safe}


def task_load_mode(t: dict) -> dict:
    """One load mode (``mmap`` on/off x ``repack`` on/off) of our ``Decoder``: load seconds, then the decode
    section's prefill and decode on random prompts. Unavailable where llama.cpp's system info says its extra
    buffers abort on deepseek2 (``decoder.extra_buffers_safe``)."""
    import llama_cpp as lc

    from ..decoder import extra_buffers_safe

    lc.llama_backend_init()
    info = lc.llama_print_system_info().decode("utf-8", "replace")
    if t["repack"] and not extra_buffers_safe(info):
        return {"available": False, "reason": "not available on this CPU: llama.cpp's system info reports "
                "AMX_INT8 = 1, and its AMX weight buffer takes MLA's 3-D attn_k_b/attn_v_b, a matmul no backend "
                "then supports: llama.cpp aborts at the first context (decoder.extra_buffers_safe)"}
    prompts = _random_prompts(_n_vocab(t["gguf"]), t["prompt_tokens"], t["runs"] + 1)
    t0 = time.perf_counter()
    dec = _our_decoder(t)
    load = time.perf_counter() - t0
    try:
        return _our_loop(dec, t, prompts) | {"available": True, "load_seconds": load}
    finally:
        dec.close()


# ---------------------------------------------------------------------------------------------------------------
# vision encode and time to first token

def _noise_image(size: tuple[int, int], seed: int) -> Any:
    """A deterministic RGB noise image of ``size`` (w, h): content does not change the compute, only the pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def _vision_encoder(mm: Any, backend: str, threads: int) -> Any:
    if backend in ("ggml", "ggml-flash"):
        from ..vision_ggml import GgmlVisionEncoder

        return GgmlVisionEncoder(mm, threads=threads, flash_attn=backend == "ggml-flash")
    from ..vision import VisionEncoder

    return VisionEncoder(mm, weight_cache=backend == "numpy-cached", threads=threads)


def _encode_seconds(enc: Any, pv: Any, grid: Any, runs: int) -> list[float]:
    secs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        enc.encode(pv, grid)
        secs.append(time.perf_counter() - t0)
    return secs


def task_vision(t: dict) -> dict:
    """One (mmproj, backend): a warm-up encode of the first size, then ``runs`` encodes per size (sizes in order)."""
    from ..image import preprocess
    from ..mmproj import MmprojFile

    mm = MmprojFile(t["mmproj"])
    cfg = mm.image_processor_config()
    hp = mm.hparams
    out: dict = {"hparams": {"hidden": hp.hidden_size, "layers": hp.num_layers, "intermediate": hp.intermediate_size,
                             "patch": hp.patch_size, "merge": hp.merge_size, "projection_dim": hp.projection_dim}}
    try:
        enc = _vision_encoder(mm, t["backend"], t["threads"])
    except (KimiVLError, OSError, ImportError) as e:
        return out | {"available": False, "error": " ".join(str(e).split())[:300], "items": []}
    inputs = [preprocess(_noise_image(tuple(s), i), cfg) for i, s in enumerate(t["sizes"])]
    t0 = time.perf_counter()
    enc.encode(*inputs[0])  # warm-up; for numpy-cached this fills the weight cache
    warmup = time.perf_counter() - t0
    items = [{"image": f"{size[0]}x{size[1]}", "grid": [int(g) for g in grid[0]],
              "seconds": _encode_seconds(enc, pv, grid, t["runs"]), "peak_rss_bytes": peak_rss()}
             for size, (pv, grid) in zip(t["sizes"], inputs)]
    return out | {"available": True, "error": None, "warmup_seconds": warmup, "items": items}


def _one_token(model: Any, msgs: list[dict]) -> tuple[float, Any]:
    """Seconds to a greedy one-token answer to ``msgs`` (the time to first token), and the turn's Stats."""
    t0 = time.perf_counter()
    it = model.stream_tokens(msgs, temperature=0.0, max_tokens=1)
    next(it, None)
    seconds = time.perf_counter() - t0
    it.close()
    return seconds, it.stats


def _ttft_run(model: Any, t: dict, seed: int) -> dict:
    """One question about a new image (time to its first token), then a follow-up about the same image."""
    from ..prompt import user_message

    model.decoder.reset()
    msgs = [user_message(t["question"], [_noise_image(tuple(t["image"]), seed)])]
    t0 = time.perf_counter()
    it = model.stream_tokens(msgs, temperature=0.0, max_tokens=8)
    first = next(it, None)
    ttft = time.perf_counter() - t0
    rest = list(it)
    st = it.stats
    answer = model.detokenize(([first] if first is not None else []) + rest) or "."
    follow = msgs + [{"role": "assistant", "content": answer}, user_message(t["followup"])]
    followup, st2 = _one_token(model, follow)
    return {"ttft": ttft, "encode": st.encode_seconds, "prefill": st.prefill_seconds, "followup": followup,
            "followup_evaluated": st2.evaluated_tokens, "image_tokens": st.image_tokens,
            "prompt_tokens": st.prompt_tokens}


def task_ttft(t: dict) -> dict:
    """KimiVL loaded as a chat would (default context); per run a new image (so nothing is cached), the KV cache
    cleared, and the time until the first generated token; then a follow-up question about the same image."""
    from ..model import KimiVL

    t0 = time.perf_counter()
    model = KimiVL.load(t["text"], t["mmproj"], n_threads=t["threads"])
    res: dict = {"load_seconds": time.perf_counter() - t0, "rss_after_load_bytes": current_rss(), "ttft": [],
                 "encode": [], "prefill": [], "followup": [], "followup_evaluated": [], "n_ctx": model.decoder.n_ctx}
    for r in range(t["runs"] + 1):   # run 0 is a warm-up
        run = _ttft_run(model, t, seed=1000 + r)
        if r == 0:
            continue
        for k in ("ttft", "encode", "prefill", "followup", "followup_evaluated"):
            res[k].append(run[k])
        res["image_tokens"], res["prompt_tokens"] = run["image_tokens"], run["prompt_tokens"]
    model.close()
    return res


def task_prefix(t: dict) -> dict:
    """A new process asks one question about the bench image (or the bench's PDF with ``document``), with the prefix
    cache in ``cache_dir`` or without (None): load time, time to the first token and where it went, the entries'
    bytes afterwards."""
    from ..model import KimiVL
    from ..prefix_cache import SUFFIX, PrefixCache
    from ..prompt import user_message

    from ..media import MediaSettings

    t0 = time.perf_counter()
    cache = PrefixCache(t["cache_dir"]) if t["cache_dir"] else None
    model = KimiVL.load(t["text"], t["mmproj"], n_ctx=t["n_ctx"], n_threads=t["threads"], prefix_cache=cache)
    load = time.perf_counter() - t0
    if "document" in t:  # a PDF: its pages at the bench's page budget (bench/media.py)
        model.media_settings = MediaSettings(page_patches=t["page_patches"])
        msgs = [user_message(t["question"], documents=[t["document"]])]
    else:
        msgs = [user_message(t["question"], [_noise_image(tuple(t["image"]), 7)])]
    ttft, st = _one_token(model, msgs)
    model.close()
    entries = list(Path(t["cache_dir"]).glob("*" + SUFFIX)) if t["cache_dir"] else []
    return {"load_seconds": load, "ttft": ttft, "restored_tokens": st.restored_tokens,
            "restore_seconds": st.restore_seconds, "encode": st.encode_seconds, "prefill": st.prefill_seconds,
            "evaluated_tokens": st.evaluated_tokens, "image_tokens": st.image_tokens,
            "prompt_tokens": st.prompt_tokens, "cache_bytes": sum(p.stat().st_size for p in entries)}


CHILD_TASKS: dict[str, Callable[[dict], dict]] = {
    "limits": task_limits, "synth": task_synth, "convert": task_convert, "mmproj": task_mmproj,
    "decode": task_decode, "system_info": task_system_info, "load_mode": task_load_mode, "vision": task_vision,
    "ttft": task_ttft, "server": task_server, "prefix": task_prefix, "media": task_media,
}
