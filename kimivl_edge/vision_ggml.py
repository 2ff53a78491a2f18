"""Second vision backend: llama.cpp's own clip encoder (``libmtmd`` of llama-cpp-python) on the same mmproj GGUF.

    enc = GgmlVisionEncoder("mmproj-Kimi-VL-A3B-Instruct-F16.gguf", threads=4)
    pixel_values, grid_hws = preprocess(images, MmprojFile(path).image_processor_config())
    embeds = enc.encode(pixel_values, grid_hws)      # one [gh*gw/4, projection_dim] float32 array per image
    enc.close()

Same interface as the numpy ``VisionEncoder`` (docs/model.md §5, §6). Each image's patches ``[gh*gw, 3, 14, 14]``
(exactly ``kimivl_edge.image.preprocess``'s output) are put back into one normalized float image of
``gh*14 x gw*14`` pixels (HWC, the interleaved RGB buffer of ``struct clip_image_f32``) and passed to
``clip_image_encode``, one image per call; llama.cpp's graph (``tools/mtmd/models/kimivl.cpp``) does the rest.

Where this backend deviates from the reference (docs/model.md §10.2; the numpy backend has none of these):

1. **Position embedding resize**: llama.cpp resamples the pos-emb table with *bilinear + antialias*
   (``resize_position_embeddings``), not PyTorch bicubic (§5.2, §10.2b). This only happens when the image grid
   differs from the table (64x64 for Kimi-VL, i.e. 896x896 pixels); on the table's own grid both add the table
   unchanged. It is the largest deviation on real images.
2. **GELU**: the projector uses tanh-approximate GELU instead of erf (§6, §10.2e). The ViT MLP is tanh-GELU in
   both, but ggml's CPU GELU reads a float16 lookup table, a further small rounding.
3. **Q/K layout**: llama.cpp's graph rotates the first half of each head by column and the second by row
   (``build_rope_2d``). Only files from our converter, whose Q/K rows are permuted into that layout (§5.4,
   ``kimivl_edge.vision.rope_layout = "ggml_split"``), are right in it. Files from llama.cpp's own converter (no
   such key) keep the checkpoint's interleaved rows, so 34 of 36 RoPE pairs turn on the wrong axis or frequency
   (§10.2a): they are refused here with an error pointing to the numpy backend.
4. **Preprocessing**: we feed HF-exact pixels (§4), so llama.cpp's own resize / centred-pad / 8..1024-token rules
   (§10.2c) do not apply; token counts are the HF ones (gh*gw/4).

Also: ggml's CPU matmuls convert activations to the weight's ``vec_dot`` type (F16 for F16 weights, Q8 for
Q8_0/Q4_0), so quantized files drift a little more than in the numpy backend, which decodes weights to float32.
Attention runs without flash attention by default (float32 scores, memory ~ 4·heads·n² bytes per image);
``flash_attn=True`` bounds memory on large images but casts K/V to float16.

The ctypes binding (``ClipLibrary``) mirrors ``tools/mtmd/clip.h`` and ``clip-impl.h`` of the llama.cpp vendored in
llama-cpp-python 0.3.36. The functions are C++ (mangled names) and take C++ structs by value, so the binding only
loads that exact version and checks that every symbol exists; token and embedding counts are cross-checked against
the file's metadata before every encode.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from .errors import KimiVLError, UsageError, one_line
from .mmproj import MmprojError, MmprojFile
from .vision import Progress, check_patches

__all__ = [
    "LLAMA_CPP_PYTHON_VERSION", "SYMBOLS", "GgmlBackendError", "ClipContextParams", "ClipInitResult",
    "StdVectorF32", "ClipImageF32", "ClipLibrary", "library_path", "check_version", "clip_library", "patches_to_image",
    "CLIP_SCALAR_TYPES", "check_clip_keys", "GgmlVisionEncoder",
]

def _pinned_llama_cpp_python() -> str:
    """The llama-cpp-python release this package pins (pyproject.toml, the one place), read from the installed
    distribution's requirements: the release whose ``libmtmd`` struct layouts this binding mirrors."""
    try:
        for req in importlib.metadata.requires("kimivl-edge") or []:
            name, _, rest = req.partition("==")
            if name.strip().replace("_", "-") == "llama-cpp-python" and rest:
                return rest.split(";")[0].strip()
    except importlib.metadata.PackageNotFoundError:
        pass
    return "unknown (kimivl-edge is not installed)"


LLAMA_CPP_PYTHON_VERSION = _pinned_llama_cpp_python()

SYMBOLS = {
    "clip_init": "_Z9clip_initPKc19clip_context_params",
    "clip_free": "_Z9clip_freeP8clip_ctx",
    "clip_n_mmproj_embd": "_Z18clip_n_mmproj_embdPK8clip_ctx",
    "clip_n_output_tokens": "_Z20clip_n_output_tokensPK8clip_ctxPK14clip_image_f32",
    "clip_image_encode": "_Z17clip_image_encodeP8clip_ctxiPK14clip_image_f32RSt6vectorIfSaIfEE",
    "mtmd_log_set": "mtmd_log_set",
}
"""C++ function -> exported (Itanium-mangled) name in ``libmtmd`` (``mtmd_log_set`` is ``extern "C"``)."""


class GgmlBackendError(KimiVLError):
    """llama.cpp's clip encoder is unavailable or failed (one-line message)."""


# ---------------------------------------------------------------------------------------------------------------
# struct layouts (tools/mtmd/clip.h, clip-impl.h; llama-cpp-python 0.3.36)

class ClipContextParams(ctypes.Structure):
    """``struct clip_context_params`` (clip.h)."""

    _fields_ = [("use_gpu", ctypes.c_bool), ("device", ctypes.c_void_p), ("flash_attn_type", ctypes.c_int),
                ("image_min_tokens", ctypes.c_int), ("image_max_tokens", ctypes.c_int), ("warmup", ctypes.c_bool),
                ("cb_eval", ctypes.c_void_p), ("cb_eval_user_data", ctypes.c_void_p), ("no_alloc", ctypes.c_bool),
                ("progress_callback", ctypes.c_void_p), ("progress_callback_user_data", ctypes.c_void_p)]


class ClipInitResult(ctypes.Structure):
    """``struct clip_init_result`` (clip.h): vision, audio and audio-generation contexts."""

    _fields_ = [("ctx_v", ctypes.c_void_p), ("ctx_a", ctypes.c_void_p), ("ctx_gen_a", ctypes.c_void_p)]


class StdVectorF32(ctypes.Structure):
    """libstdc++ ``std::vector<float>``: begin, end, end of storage.

    Only ever a view of a numpy array that clip reads (the input image, copied by ``clip_image_encode``) or fills in
    place without resizing (the output, whose size must equal tokens x n_embd: clip aborts otherwise).
    """

    _fields_ = [("begin", ctypes.c_void_p), ("end", ctypes.c_void_p), ("cap", ctypes.c_void_p)]

    @classmethod
    def over(cls, a: np.ndarray) -> "StdVectorF32":
        if a.dtype != np.float32 or not a.flags.c_contiguous or a.size == 0:
            raise ValueError("a std::vector<float> view needs a non-empty C-contiguous float32 array")
        return cls(a.ctypes.data, a.ctypes.data + a.nbytes, a.ctypes.data + a.nbytes)


class ClipImageF32(ctypes.Structure):
    """``struct clip_image_f32`` (clip-impl.h): flags, lead_pad, anyres_info (4 ints), buf (RGBRGB... floats, row
    major), nx_, ny_."""

    _fields_ = [("add_viewsep", ctypes.c_bool), ("add_newline", ctypes.c_bool), ("lead_pad", ctypes.c_int32),
                ("grid_x", ctypes.c_int), ("grid_y", ctypes.c_int), ("orig_nx", ctypes.c_int),
                ("orig_ny", ctypes.c_int), ("buf", StdVectorF32), ("nx", ctypes.c_int), ("ny", ctypes.c_int)]

    @classmethod
    def over(cls, hwc: np.ndarray) -> "ClipImageF32":
        """A view of a C-contiguous float32 [H, W, 3] image; keep ``hwc`` alive while the struct is used."""
        if hwc.ndim != 3 or hwc.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] image, got {list(hwc.shape)}")
        return cls(nx=hwc.shape[1], ny=hwc.shape[0], buf=StdVectorF32.over(hwc))


LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)  # ggml_log_callback


def _log(level: int, text: bytes | None, user_data: object) -> None:
    """clip's log goes nowhere unless KIMIVL_EDGE_VERBOSE is set."""
    if text and os.environ.get("KIMIVL_EDGE_VERBOSE"):
        sys.stderr.write(text.decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------------------------------------
# the library

def library_path() -> Path:
    """Path of ``libmtmd`` inside the installed ``llama_cpp`` package (found without importing it)."""
    from .quant.ggml_c import find_llama_cpp_library

    try:
        return find_llama_cpp_library("mtmd")
    except FileNotFoundError as e:
        raise GgmlBackendError(f"the ggml vision backend needs llama-cpp-python with mtmd: {e}") from None


def check_version() -> None:
    """Refuse any llama-cpp-python but the one whose struct layouts this binding mirrors (one-line error)."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise GgmlBackendError("the ggml vision backend needs llama-cpp-python, which is not installed") from None
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise GgmlBackendError(f"the ggml vision backend binds llama.cpp's internal clip API of llama-cpp-python "
                               f"{LLAMA_CPP_PYTHON_VERSION}, found {version}: use the numpy vision backend")


class ClipLibrary:
    """ctypes binding of the few clip functions the encoder needs (tools/mtmd/clip.h)."""

    def __init__(self, path: str | os.PathLike):
        try:
            self._lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise GgmlBackendError(f"cannot load {path}: {one_line(e)}") from None
        missing = [f for f, sym in SYMBOLS.items() if not hasattr(self._lib, sym)]
        if missing:
            raise GgmlBackendError(f"{path} lacks {', '.join(missing)} (llama.cpp's internal clip API changed; this "
                                   f"binding is for llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})")
        f = {name: getattr(self._lib, sym) for name, sym in SYMBOLS.items()}
        f["clip_init"].argtypes, f["clip_init"].restype = [ctypes.c_char_p, ClipContextParams], ClipInitResult
        f["clip_free"].argtypes, f["clip_free"].restype = [ctypes.c_void_p], None
        f["clip_n_mmproj_embd"].argtypes, f["clip_n_mmproj_embd"].restype = [ctypes.c_void_p], ctypes.c_int
        f["clip_n_output_tokens"].argtypes = [ctypes.c_void_p, ctypes.POINTER(ClipImageF32)]
        f["clip_n_output_tokens"].restype = ctypes.c_int
        f["clip_image_encode"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ClipImageF32),
                                           ctypes.POINTER(StdVectorF32)]
        f["clip_image_encode"].restype = ctypes.c_bool
        f["mtmd_log_set"].argtypes, f["mtmd_log_set"].restype = [LOG_CALLBACK, ctypes.c_void_p], None
        self._f = f
        self.path = Path(path)
        self._log_cb = LOG_CALLBACK(_log)  # kept alive as long as the library object
        f["mtmd_log_set"](self._log_cb, None)
        self._silence_ggml()

    def _silence_ggml(self) -> None:
        """Route ggml's own log (e.g. gguf's "failed to open") through the same callback. ``ggml_log_set`` is looked
        up through libmtmd's handle, i.e. in the very ggml-base it links (llama-cpp-python ships copies, not
        symlinks, so opening ``libggml-base.so`` by path could load a second, unrelated copy). Process-wide, like the
        decoder's ``llama_log_set``, which installs an equivalent callback in the same ggml-base."""
        fn = getattr(self._lib, "ggml_log_set", None)
        if fn is None:
            return
        fn.argtypes, fn.restype = [LOG_CALLBACK, ctypes.c_void_p], None
        fn(self._log_cb, None)

    def init(self, mmproj: str | os.PathLike, flash_attn: bool = False) -> int:
        """``clip_init`` on the CPU, no warmup (buffers are sized by the first encode); returns the vision context
        (0 if llama.cpp could not load the file). Any audio context is freed at once."""
        params = ClipContextParams(use_gpu=False, device=None, flash_attn_type=1 if flash_attn else 0,
                                   image_min_tokens=-1, image_max_tokens=-1, warmup=False, cb_eval=None,
                                   cb_eval_user_data=None, no_alloc=False, progress_callback=None,
                                   progress_callback_user_data=None)
        res = self._f["clip_init"](os.fsencode(mmproj), params)
        for extra in (res.ctx_a, res.ctx_gen_a):
            if extra:
                self.free(extra)
        return res.ctx_v or 0

    def free(self, ctx: int) -> None:
        self._f["clip_free"](ctx)

    def n_mmproj_embd(self, ctx: int) -> int:
        return int(self._f["clip_n_mmproj_embd"](ctx))

    def n_output_tokens(self, ctx: int, image: ClipImageF32) -> int:
        return int(self._f["clip_n_output_tokens"](ctx, ctypes.byref(image)))

    def image_encode(self, ctx: int, n_threads: int, image: ClipImageF32, out: np.ndarray) -> bool:
        """``clip_image_encode`` into ``out`` (float32 [tokens, n_embd], exactly the size clip reports)."""
        return bool(self._f["clip_image_encode"](ctx, n_threads, ctypes.byref(image),
                                                 ctypes.byref(StdVectorF32.over(out))))


@lru_cache(maxsize=1)
def clip_library() -> ClipLibrary:
    """The process-wide binding of llama-cpp-python's ``libmtmd`` (version and symbols checked)."""
    check_version()
    return ClipLibrary(library_path())


# ---------------------------------------------------------------------------------------------------------------
# what clip_init does not check

_U32, _STR, _BOOL = GGUFValueType.UINT32, GGUFValueType.STRING, GGUFValueType.BOOL
CLIP_SCALAR_TYPES: dict[str, GGUFValueType] = {
    "general.name": _STR, "general.description": _STR,
    "clip.has_vision_encoder": _BOOL, "clip.has_audio_encoder": _BOOL, "clip.has_gen_audio_encoder": _BOOL,
    "clip.projector_type": _STR, "clip.vision.projector_type": _STR,
    "clip.vision.embedding_length": _U32, "clip.vision.attention.head_count": _U32,
    "clip.vision.attention.head_dim": _U32, "clip.vision.feed_forward_length": _U32, "clip.vision.block_count": _U32,
    "clip.vision.projection_dim": _U32, "clip.vision.attention.layer_norm_epsilon": GGUFValueType.FLOAT32,
    "clip.vision.attention.head_count_kv": _U32, "clip.vision.image_size": _U32, "clip.vision.patch_size": _U32,
    "clip.minicpmv_version": GGUFValueType.INT32, "clip.minicpmv_query_num": _U32,
    "clip.use_gelu": _BOOL, "clip.use_silu": _BOOL, "clip.vision.mm_patch_merge_type": _STR,
    "clip.vision.projector.scale_factor": _U32,
}
"""Every scalar key ``clip_init`` reads from a vision-only ``kimivl`` projector (``clip_model_loader`` in
tools/mtmd/clip.cpp, names from clip-impl.h), with the one GGUF type its getter takes: ``gguf_get_val_u32`` and its
siblings abort the process (GGML_ASSERT) on any other type. Array keys clip checks itself (an exception, which
``clip_init`` turns into a failed load)."""


def check_clip_keys(mm: MmprojFile) -> None:
    """Refuse (one-line ``MmprojError``) an mmproj that llama.cpp's clip would abort on rather than refuse: a scalar
    key it reads in another type than its getter's, or an audio encoder (clip would then read the audio keys too;
    Kimi-VL has none)."""
    for key, want in CLIP_SCALAR_TYPES.items():
        got = mm.value_type(key)
        if got is not None and got != want:
            raise MmprojError(f"{mm.path}: metadata {key} is {got.name}, llama.cpp's clip reads it as {want.name} "
                              "(it would abort): use the numpy vision backend or re-convert")
    for key in ("clip.has_audio_encoder", "clip.has_gen_audio_encoder"):
        if mm.value(key, False) is not False:
            raise MmprojError(f"{mm.path}: {key} is set: not a vision-only Kimi-VL mmproj")


# ---------------------------------------------------------------------------------------------------------------
# pixels

def patches_to_image(patches: np.ndarray, gh: int, gw: int, patch_size: int) -> np.ndarray:
    """Patches [gh*gw, 3, p, p] (row-major over the grid, (channel, row, column) inside: docs/model.md §4 step 6)
    -> the normalized image [gh*p, gw*p, 3] float32, C-contiguous (clip_image_f32's interleaved RGB buffer)."""
    p = patch_size
    x = np.asarray(patches, dtype=np.float32).reshape(gh, gw, 3, p, p)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 4, 2)).reshape(gh * p, gw * p, 3)


# ---------------------------------------------------------------------------------------------------------------
# the encoder

class GgmlVisionEncoder:
    """MoonViT + merge + projector by llama.cpp's clip graph (CPU), on an mmproj GGUF made by our converter.

    ``threads``: ``n_threads`` of ``clip_image_encode`` (default: all cores). ``flash_attn``: ggml's flash attention
    (less memory on large images, K/V in float16); off by default. See the module docstring for the deviations.
    """

    def __init__(self, mmproj: MmprojFile | str | os.PathLike, threads: int | None = None, *,
                 flash_attn: bool = False):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UsageError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or os.cpu_count() or 1
        self.mmproj = mmproj if isinstance(mmproj, MmprojFile) else MmprojFile(mmproj)
        self.hparams = hp = self.mmproj.hparams
        path = self.mmproj.path
        if hp.rope_layout != "ggml_split":
            raise MmprojError(f"{path}: Q/K rows in the checkpoint's interleaved order (made by llama.cpp's "
                              "converter?): llama.cpp's clip graph would turn 34 of 36 RoPE pairs on the wrong axis; "
                              "use the numpy vision backend or re-convert with kimivl-edge")
        if hp.pos_emb_height != hp.pos_emb_width:
            raise MmprojError(f"{path}: {hp.pos_emb_height}x{hp.pos_emb_width} position table; llama.cpp's clip "
                              "assumes a square one: use the numpy vision backend")
        check_clip_keys(self.mmproj)
        self._lib = clip_library()
        self._ctx = self._lib.init(path, flash_attn)
        if not self._ctx:
            raise GgmlBackendError(f"llama.cpp's clip_init could not load {path} (set KIMIVL_EDGE_VERBOSE=1 for "
                                   "its log)")
        n_embd = self._lib.n_mmproj_embd(self._ctx)
        if n_embd != hp.projection_dim:
            self.close()
            raise GgmlBackendError(f"llama.cpp's clip reports n_embd {n_embd}, the file says {hp.projection_dim} "
                                   "(clip API mismatch?)")
        self.n_embd = n_embd

    # -- lifecycle --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free llama.cpp's context (idempotent)."""
        ctx, self._ctx = getattr(self, "_ctx", 0), 0
        if ctx:
            self._lib.free(ctx)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "GgmlVisionEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- encoding ---------------------------------------------------------------------------------------------
    def _check_inputs(self, pixel_values: np.ndarray, grid_hws: object) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Same rules as the numpy backend."""
        return check_patches(pixel_values, grid_hws, self.hparams.patch_size, self.hparams.merge_size)

    def encode_image(self, patches: np.ndarray, gh: int, gw: int) -> np.ndarray:
        """One image's patches [gh*gw, 3, p, p] -> [gh*gw/m², n_embd] float32 (docs/model.md §5, §6 as llama.cpp
        computes them)."""
        if not self._ctx:
            raise UsageError("this GgmlVisionEncoder is closed")
        hp = self.hparams
        hwc = patches_to_image(patches, gh, gw, hp.patch_size)
        image = ClipImageF32.over(hwc)
        n_tokens = self._lib.n_output_tokens(self._ctx, image)
        want = gh * gw // (hp.merge_size * hp.merge_size)
        if n_tokens != want:
            raise GgmlBackendError(f"llama.cpp's clip expects {n_tokens} tokens for a {gh}x{gw} grid, not {want} "
                                   "(clip API mismatch?)")
        out = np.empty((n_tokens, self.n_embd), dtype=np.float32)
        if not self._lib.image_encode(self._ctx, self.threads, image, out):
            raise GgmlBackendError(f"llama.cpp's clip_image_encode failed on a {gh}x{gw} grid (set "
                                   "KIMIVL_EDGE_VERBOSE=1 for its log)")
        return out

    def encode(self, pixel_values: np.ndarray, grid_hws: object, progress: Progress | None = None) -> list[np.ndarray]:
        """Image embeddings, one [gh*gw/4, projection_dim] float32 array per image, one clip call per image.

        ``pixel_values`` [Σ gh·gw, 3, p, p] and ``grid_hws`` [n_images, 2] as made by
        ``kimivl_edge.image.preprocess``.
        ``progress(i + 1, n_images, "image")`` (``vision.Progress``) is called when image i (0-based) has been encoded
        (clip runs all layers of one image per call).
        """
        patches, grids = self._check_inputs(pixel_values, grid_hws)
        out, start = [], 0
        for i, (gh, gw) in enumerate(grids):
            out.append(self.encode_image(patches[start:start + gh * gw], gh, gw))
            start += gh * gw
            if progress is not None:
                progress(i + 1, len(grids), "image")
        return out

    def __repr__(self) -> str:
        return f"GgmlVisionEncoder({str(self.mmproj.path)!r}, threads={self.threads})"
