"""The MoE decoder through llama.cpp's low-level API: token batches and embedding batches, KV-cache reuse.

A prompt is a list of segments: runs of token ids, and blocks of image-embedding rows (one row per merged image
token, projector output, inserted without scaling). Each segment is evaluated in its own ``llama_decode`` calls,
chunked to ``n_batch``, with continuous positions 0..T-1 (1-D RoPE over image rows too, docs/model.md §7.1).

KV reuse: the decoder remembers a key per cached position (the token id, or (image key, row) for an embedding row).
A new prompt that starts with the cached prefix evaluates only what follows, so a follow-up question about an image
costs only the new tokens.

Memory: llama.cpp's CPU backend repacks some weight types (Q4_0, Q4_K, IQ4_NL, ... on this instruction set) into
interleaved copies (the CPU_REPACK buffer). With the file memory-mapped, the pages read to build those copies stay
mapped, so the process holds the file *and* the repacked copy (up to ≈ 1.5× the file for Q4_K_M). By default
(``mmap=None``) a file with tensors llama.cpp would repack is therefore read into llama.cpp's own buffers instead
(``LLAMA_LOAD_MODE_NONE``: peak RSS ≈ file size, same kernels, same speed; loading costs a copy of the file);
any other file is memory-mapped. ``repack=False`` is the other way to the same memory: the file is mapped and the
weights are used in their file layout (fastest load, llama.cpp's non-repacked kernels: on a Q4_K_M MoE file here,
1 thread, prefill 1.17x and decode 0.98x the repacked speed, the latter within this machine's noise).
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from .errors import GGUFFileError, KimiVLError, UsageError, check_int
from .gguf_file import GGUFFile
from .gguf_model import check_text_gguf

if TYPE_CHECKING:
    from .vision import Progress

GT = GGMLQuantizationType
KV_TYPES = {"f32": GT.F32, "f16": GT.F16, "q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "bf16": GT.BF16}
LOAD_MODE_NONE, LOAD_MODE_MMAP = 0, 1  # enum llama_load_mode

# ggml types that ggml-cpu/repack.cpp (llama.cpp of llama-cpp-python 0.3.36) can repack for MUL_MAT / MUL_MAT_ID,
# by instruction set: x86 needs AVX2 (Q2_K: AVX-512); ARM and others repack more types.
_REPACK_AVX2 = frozenset({GT.Q4_0, GT.Q4_K, GT.IQ4_NL, GT.MXFP4})
_REPACK_ANY = frozenset({GT.Q4_0, GT.Q8_0, GT.Q2_K, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.IQ4_NL, GT.MXFP4, GT.Q1_0})
_NOT_MATMUL = ("token_embd.weight",)  # read with get_rows: never repacked


@dataclass(frozen=True)
class ImageBlock:
    """Embedding rows for one image; ``key`` identifies the image (content hash) for KV reuse."""

    rows: np.ndarray  # [n, n_embd] float32
    key: Hashable


Segment: TypeAlias = Sequence[int] | ImageBlock  # a run of token ids, or one image's embedding rows


@dataclass
class DecoderSettings:
    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None
    kv_type: str = "f16"  # llama.cpp's default; tests use f32 (an F16 KV cache moves logits visibly)
    flash_attn: bool = False
    mmap: bool | None = None  # None: mmap unless llama.cpp would repack weights (see the module docstring)
    repack: bool = True       # llama.cpp's interleaved CPU_REPACK weights (use_extra_bufts); False keeps file layout

    def __post_init__(self):
        if self.kv_type not in KV_TYPES:
            raise UsageError(f"unknown KV cache type {self.kv_type!r} (choose from {', '.join(KV_TYPES)})")
        check_int("n_ctx", self.n_ctx, 16, 131072)
        check_int("n_batch", self.n_batch, 1, 131072)
        check_int("n_ubatch", self.n_ubatch, 1, 131072)
        if self.n_threads is not None:
            check_int("n_threads", self.n_threads, 1, 1024)
        for name in ("flash_attn", "repack"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.mmap is not None and not isinstance(self.mmap, bool):
            raise UsageError(f"mmap must be True, False or None, got {self.mmap!r}")
        if kv_block(self.kv_type) > 1 and not self.flash_attn:
            raise UsageError(f"kv_type {self.kv_type} needs flash_attn=True (--flash-attn): llama.cpp keeps a "
                             "quantized V cache only with flash attention")


def kv_block(kv_type: str) -> int:
    """Elements per block of a KV cache type (1: not quantized)."""
    return GGML_QUANT_SIZES[KV_TYPES[kv_type]][0]


def check_kv_heads(path: str | Path, kv_type: str) -> None:
    """A quantized KV cache needs the block size to divide the K and V head sizes (llama.cpp refuses the context
    otherwise). Checked from the GGUF's metadata before the weights are loaded. With MLA (Kimi-VL) the cached K head
    is kv_lora_rank + rope dimensions: 576 on the real model, 272 on the tiny ones (not a multiple of 32)."""
    block = kv_block(kv_type)
    if block == 1:
        return
    try:
        with GGUFFile(path) as f:
            meta = f.metadata
    except GGUFFileError:
        return  # llama.cpp reports the file
    arch = meta.get(Keys.General.ARCHITECTURE)
    heads = {key.split(".")[-1]: meta.get(key.format(arch=arch))
             for key in (Keys.Attention.KEY_LENGTH, Keys.Attention.VALUE_LENGTH)}
    bad = [f"{k} {n}" for k, n in heads.items() if isinstance(n, int) and n % block]
    if bad:
        raise UsageError(f"kv_type {kv_type} needs head sizes that are multiples of {block}; this model has "
                         f"{', '.join(bad)} (use f16, bf16 or f32)")


_LOG_CB = None  # keeps the ctypes callback alive
_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_errors: list[str] = []  # llama.cpp's error lines since the last _take_errors()


def _log(level, text, user_data):
    """llama.cpp's log goes nowhere unless KIMIVL_EDGE_VERBOSE is set; its error lines are kept for our messages."""
    line = text.decode("utf-8", "replace")
    if level == _LOG_ERROR:
        _errors.append(line.strip())
        del _errors[:-4]
    if os.environ.get("KIMIVL_EDGE_VERBOSE"):
        import sys

        sys.stderr.write(line)


def _take_errors() -> str:
    """llama.cpp's last error line (its reason for a failure), or a pointer to its log."""
    reason = _errors[-1] if _errors else "set KIMIVL_EDGE_VERBOSE=1 for its log"
    _errors.clear()
    return reason


def _cpu_flags(system_info: str) -> set[str]:
    """The features llama.cpp's CPU backend reports as on, from its system info ("AVX2 = 1 | ... | REPACK = 1")."""
    return {f.split("=")[0].strip() for f in system_info.split("|") if f.strip().endswith("= 1")}


def extra_buffers_safe(system_info: str) -> bool:
    """Whether llama.cpp's extra weight buffers (``use_extra_bufts``) can be used for deepseek2 here. On a CPU with
    AMX (Xeon Sapphire Rapids and later) they include the AMX buffer, which takes Q4_0/Q4_K/Q5_K/Q6_K/Q8_0 matrices
    including MLA's 3-D ``attn_k_b``/``attn_v_b``; the graph then holds a matmul no backend supports and llama.cpp
    aborts the process (``GGML_ASSERT(*cur_backend_id != -1)`` in ggml-backend.cpp, llama-cpp-python 0.3.36) at the
    first context. There, the weights stay in their file layout (what ``repack=False`` does everywhere)."""
    return "AMX_INT8" not in _cpu_flags(system_info)


def model_params(repack: bool = True):
    """llama.cpp's model parameters for a CPU load of a text GGUF: no GPU layers, and llama.cpp's extra (repacked)
    weight buffers when ``repack`` and where they are safe (``extra_buffers_safe``). Every llama.cpp load of a
    deepseek2 file in this project (the decoder, the bench's raw loop, the libmtmd comparison) starts from these."""
    lc = _backend()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = repack and extra_buffers_safe(lc.llama_print_system_info().decode("utf-8", "replace"))
    return mp


def _repack_types(system_info: str) -> frozenset[GGMLQuantizationType]:
    """Weight types llama.cpp's CPU backend repacks here, from its system info ("AVX2 = 1 | ... | REPACK = 1")."""
    flags = _cpu_flags(system_info)
    if "REPACK" not in flags or not extra_buffers_safe(system_info):
        return frozenset()
    if "AVX2" in flags:
        return _REPACK_AVX2 | ({GT.Q2_K} if "AVX512" in flags else set())
    return _REPACK_ANY  # other instruction sets: every type repack.cpp knows (when unsure, do not map)


def tensor_types(path: str | Path) -> dict[str, GGMLQuantizationType] | None:
    """Tensor name -> ggml type from the GGUF's tensor index; None if the file cannot be read as a GGUF."""
    try:
        with GGUFFile(path) as f:
            return {name: t.type for name, t in f.tensors.items()}
    except GGUFFileError:
        return None


def repacked_tensors(path: str | Path) -> list[str]:
    """Weights of ``path`` of a type llama.cpp's CPU backend repacks (CPU_REPACK buffers) on this machine; an upper
    bound (row counts and ops are not checked: e.g. 3-D attn_v_b stays in the CPU buffer)."""
    return _repacked(tensor_types(path) or {})


def _repacked(types: Mapping[str, GGMLQuantizationType]) -> list[str]:
    """``repacked_tensors`` of a file whose tensor types are ``types``."""
    lc = _backend()
    repack = _repack_types(lc.llama_print_system_info().decode("utf-8", "replace"))
    return [n for n, t in types.items() if t in repack and n not in _NOT_MATMUL]


def _backend():
    global _LOG_CB
    import llama_cpp

    if _LOG_CB is None:
        llama_cpp.llama_backend_init()
        _LOG_CB = llama_cpp.llama_log_callback(_log)
    # set every time: llama-cpp-python's Llama(verbose=False) installs its own callback in the same process, and
    # llama.cpp's reasons for a failure reach our errors only through ours
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
    return llama_cpp


def _load_callback(progress: Progress, failed: list[BaseException]):
    """llama.cpp's load progress (a float 0..1, many calls) as ``progress(percent, 100, "%")`` once per new percent.
    An exception in ``progress`` (Ctrl-C included) cancels the load and is kept in ``failed`` to be re-raised."""
    import llama_cpp

    last = [-1]

    def call(fraction: float, user_data) -> bool:
        try:
            pct = min(100, int(fraction * 100))
            if pct > last[0]:
                last[0] = pct
                progress(pct, 100, "%")
            return True
        except BaseException as e:  # noqa: B036 (a ctypes callback cannot raise: cancel, re-raise after the load)
            failed.append(e)
            return False

    return llama_cpp.llama_progress_callback(call)


def _counter(progress: Progress | None, total: int) -> Callable[[int], None]:
    """``advance(n)``: n more of ``total`` positions evaluated, reported as ``progress(done, total, "token")``."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, "token")

    return advance


class Decoder:
    """One llama.cpp model + context, a single sequence, with prefix-reusing evaluation."""

    def __init__(self, model_path: str | Path, settings: DecoderSettings | None = None,
                 progress: Progress | None = None, eval_callback: object = None,
                 checked: dict[str, GGMLQuantizationType] | None = None):
        """``progress(done, 100, "%")``: progress of llama.cpp's model load (an exception it raises cancels it).
        ``eval_callback``: llama.cpp's graph eval callback (a ``llama_cpp.ggml_backend_sched_eval_callback``, kept
        alive here), called for every node of every evaluation (the imatrix collector reads matmul inputs).
        ``checked``: the tensor types of a ``check_text_gguf`` the caller made of this file (``KimiVL.load`` gets
        them from ``TextModelInfo.read(tensors=True)``, so the header is parsed once); None checks here."""
        self.settings = s = settings or DecoderSettings()
        # llama.cpp aborts on some hostile files: it sees only files that pass
        types = checked if checked is not None else check_text_gguf(model_path)
        lc = _backend()
        check_kv_heads(model_path, s.kv_type)
        _take_errors()
        mp = model_params(s.repack)
        self.repack = bool(mp.use_extra_bufts)  # repack=True asks for repacked copies where they are safe
        self.mmap = s.mmap if s.mmap is not None else not (self.repack and _repacked(types))
        mp.load_mode = LOAD_MODE_MMAP if self.mmap else LOAD_MODE_NONE
        failed: list[BaseException] = []
        if progress is not None:
            mp.progress_callback = _load_callback(progress, failed)  # mp keeps the ctypes callback alive
        self._model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
        if failed:
            if self._model:
                lc.llama_model_free(self._model)
            raise failed[0]
        if not self._model:
            raise KimiVLError(f"llama.cpp could not load {model_path} ({_take_errors()})")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = s.n_ctx, s.n_batch, min(s.n_ubatch, s.n_batch)
        threads = s.n_threads or os.cpu_count() or 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = KV_TYPES[s.kv_type]
        cp.no_perf = True
        # llama.cpp's CPU flash attention rounds through F16 (5e-4 relative logit error on the tiny model): opt-in.
        cp.flash_attn_type = 1 if s.flash_attn else 0
        if eval_callback is not None:
            cp.cb_eval = eval_callback
        self._eval_callback = eval_callback
        self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise KimiVLError(f"llama.cpp could not create a context of {s.n_ctx} tokens ({_take_errors()})")
        self._lc = lc
        self.n_embd = lc.llama_model_n_embd(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_batch = lc.llama_n_batch(self._ctx)
        self._mem = lc.llama_get_memory(self._ctx)
        self._keys: list[Hashable] = []  # what occupies each cached position
        self.n_evaluated = 0             # positions evaluated by llama_decode since load (for tests and stats)
        self._tok_batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._emb_batch = lc.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._one = lc.llama_batch_init(1, 0, 1)  # append(): only token[0] and pos[0] change per call
        self._one.n_tokens, self._one.n_seq_id[0], self._one.seq_id[0][0], self._one.logits[0] = 1, 1, 0, 1
        self._one_token, self._one_pos = self._one.token, self._one.pos

    # -- lifecycle --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free llama.cpp's context and model; idempotent. Every later call raises KimiVLError."""
        ctx, model = getattr(self, "_ctx", None), getattr(self, "_model", None)
        if not ctx:
            return
        self._ctx = self._model = None  # first, so that nothing can reach the freed memory
        lc = self._lc
        lc.llama_batch_free(self._tok_batch)
        lc.llama_batch_free(self._emb_batch)
        lc.llama_batch_free(self._one)
        lc.llama_free(ctx)
        lc.llama_model_free(model)

    @property
    def closed(self) -> bool:
        return not getattr(self, "_ctx", None)

    def _check_open(self) -> None:
        if self.closed:
            raise KimiVLError("the model is closed")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def n_past(self) -> int:
        return len(self._keys)

    def reset(self) -> None:
        """Empty the cache."""
        self._check_open()
        self._keys = []
        self._lc.llama_memory_clear(self._mem, True)

    def _resync(self) -> None:
        """After an interrupted evaluation (an exception, KeyboardInterrupt included, between or right after
        llama_decode calls): trim llama.cpp's memory and the keys to the positions both hold, so that the next
        prefill evaluates exactly what is missing. llama.cpp keeps what a returned llama_decode wrote even when
        Python never recorded it."""
        n = min(len(self._keys), self._lc.llama_memory_seq_pos_max(self._mem, 0) + 1)
        self._lc.llama_memory_seq_rm(self._mem, 0, n, -1)
        del self._keys[n:]

    # -- state (the persistent prefix cache, prefix_cache.py) --------------------------------------------------
    def state_settings(self) -> dict[str, object]:
        """The settings a saved state depends on (its layout, or the numbers that produced it)."""
        s = self.settings
        return {"kv_type": s.kv_type, "flash_attn": s.flash_attn, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
                "n_ubatch": min(s.n_ubatch, s.n_batch), "repack": self.repack}

    def cached_prefix(self, keys: Sequence[Hashable]) -> int:
        """How many leading ``keys`` the cache holds."""
        n = 0
        for a, b in zip(self._keys, keys):
            if a != b:
                break
            n += 1
        return n

    def save_state(self) -> bytes:
        """llama.cpp's state of the sequence (its KV cells), as ``load_state`` takes it back."""
        self._check_open()
        lc = self._lc
        n = lc.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        if lc.llama_state_seq_get_data(self._ctx, buf, n, 0) != n:
            raise KimiVLError(f"llama.cpp could not save the sequence state ({_take_errors()})")
        return bytes(buf)

    def load_state(self, state: bytes, keys: Sequence[Hashable]) -> bool:
        """Replace the cache by a saved state holding ``keys``; False (cache left empty) if llama.cpp refuses it."""
        self.reset()
        try:
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            ok = self._lc.llama_state_seq_set_data(self._ctx, buf, len(state), 0) == len(state)
            ok = ok and self._lc.llama_memory_seq_pos_max(self._mem, 0) + 1 == len(keys)
        except BaseException:
            self.reset()  # interrupted: llama.cpp's memory may hold part of the state, the keys none
            raise
        if not ok:
            _take_errors()
            self.reset()
            return False
        self._keys = list(keys)
        return True

    # -- evaluation -------------------------------------------------------------------------------------------
    @staticmethod
    def segment_keys(segments: Sequence[Segment]) -> list[Hashable]:
        keys: list[Hashable] = []
        for seg in segments:
            if isinstance(seg, ImageBlock):
                keys.extend((seg.key, i) for i in range(len(seg.rows)))
            else:
                keys.extend(int(t) for t in seg)
        return keys

    def prefill(self, segments: Sequence[Segment], n_logits: int | None = None,
                progress: Progress | None = None) -> np.ndarray:
        """Make the cache hold exactly ``segments``: the longest prefix it already holds is kept, only the rest is
        evaluated. Returns the logits of the last position ([n_vocab]), or with ``n_logits`` those of the last
        ``n_logits`` positions ([n_logits, n_vocab]); the positions whose logits are returned are always evaluated,
        cached or not. ``progress(done, total, "token")`` is called after each evaluated chunk: ``done`` of the
        ``total`` positions this call evaluates. Interrupted (any exception), the cache keeps the prefix it had
        evaluated, consistently."""
        self._check_open()
        try:
            return self._prefill(segments, n_logits, progress)
        except BaseException:
            self._resync()
            raise

    def _prefill(self, segments: Sequence[Segment], n_logits: int | None, progress: Progress | None) -> np.ndarray:
        keys = self.segment_keys(segments)
        if not keys:
            raise UsageError("empty prompt")
        if len(keys) > self.n_ctx:
            raise UsageError(f"prompt of {len(keys)} tokens (incl. image tokens) exceeds the context of "
                             f"{self.n_ctx}; raise n_ctx or cap the image tokens")
        k = 1 if n_logits is None else n_logits
        if not 1 <= k <= len(keys):
            raise UsageError(f"n_logits must be between 1 and the {len(keys)} positions of the prompt, got {k}")
        first = len(keys) - k  # the first position whose logits are returned
        common = min(self.cached_prefix(keys), first)
        self._truncate(common)
        advance = _counter(progress, len(keys) - common)
        out = []
        pos = 0
        for seg in segments:
            n = len(seg.rows) if isinstance(seg, ImageBlock) else len(seg)
            lo = max(common - pos, 0)
            if lo < n:
                if isinstance(seg, ImageBlock):
                    out += self._eval_embd(seg.rows[lo:], pos + lo, [(seg.key, i) for i in range(lo, n)], first,
                                           advance)
                else:
                    out += self._eval_tokens([int(t) for t in seg[lo:]], pos + lo, first, advance)
            pos += n
        return out[-1] if n_logits is None else np.stack(out)

    def _truncate(self, n: int) -> None:
        if n < len(self._keys):
            del self._keys[n:]
            self._lc.llama_memory_seq_rm(self._mem, 0, n, -1)

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        rc = self._lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise KimiVLError(f"llama_decode failed (code {rc}); the context may be full")
        self.n_evaluated += n

    def _logits(self, i: int) -> np.ndarray:
        p = self._lc.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def _eval_tokens(self, ids: list[int], pos0: int, logits_from: int,
                     advance: Callable[[int], None] = lambda n: None) -> list[np.ndarray]:
        """Evaluate ``ids`` at positions pos0..; returns the logits of the positions >= ``logits_from``."""
        b, out = self._tok_batch, []
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s: s + self.n_batch]
            for j, t in enumerate(chunk):
                b.token[j] = t
                b.pos[j] = pos0 + s + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = pos0 + s + j >= logits_from
            self._decode(b, len(chunk))
            self._keys.extend(chunk)
            advance(len(chunk))
            out += [self._logits(j) for j in range(len(chunk)) if pos0 + s + j >= logits_from]
        return out

    def _eval_embd(self, rows: np.ndarray, pos0: int, keys: list, logits_from: int,
                   advance: Callable[[int], None] = lambda n: None) -> list[np.ndarray]:
        """Evaluate embedding ``rows`` at positions pos0..; returns the logits of the positions >= ``logits_from``."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise KimiVLError(f"image embeddings have width {rows.shape[-1]}, the text model expects {self.n_embd}")
        b, out = self._emb_batch, []
        for s in range(0, len(rows), self.n_batch):
            chunk = rows[s: s + self.n_batch]
            n = len(chunk)
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)
            for j in range(n):
                b.pos[j] = pos0 + s + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = pos0 + s + j >= logits_from
            self._decode(b, n)
            self._keys.extend(keys[s: s + n])
            advance(n)
            out += [self._logits(j) for j in range(n) if pos0 + s + j >= logits_from]
        return out

    def append(self, token: int, logits: bool = False) -> np.ndarray | None:
        """Evaluate one generated token at the end of the cache (the per-token step of generation: a preset one-token
        batch, only its token and position change); with ``logits``, return a copy of its logits ([n_vocab])."""
        self._check_open()
        keys = self._keys
        n = len(keys)
        if n >= self.n_ctx:
            raise KimiVLError(f"context of {self.n_ctx} tokens is full")
        token = int(token)
        self._one_token[0], self._one_pos[0] = token, n
        try:
            self._decode(self._one, 1)
            keys.append(token)
        except BaseException:
            self._resync()
            raise
        return self._logits(0) if logits else None

    @property
    def ctx(self):
        self._check_open()
        return self._ctx

    @property
    def model(self):
        self._check_open()
        return self._model
