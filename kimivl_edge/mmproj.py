"""Read a Kimi-VL mmproj GGUF (arch ``clip``, projector ``kimivl``): hyper-parameters and memory-mapped tensors.

Two producers are accepted:

* our converter (``kimivl_edge.convert.mmproj``): llama.cpp's ``clip.*`` keys plus ``kimivl_edge.*`` keys for the
  preprocessing budget (``in_token_limit``, ``pad_input``), the pos-emb grid, the projector GELU and the Q/K row
  layout ``kimivl_edge.vision.rope_layout = "ggml_split"`` (docs/model.md §5.4);
* llama.cpp's own converter: only the ``clip.*`` keys (docs/model.md §11), Q/K rows in the checkpoint's interleaved
  order (§10.2a), so the layout is "hf_interleaved"; the pos-emb grid is the square root of the table's rows and
  ``in_token_limit`` falls back to 4096 (see ``image_processor_config``).

Tensor names are those ``tools/mtmd/clip.cpp`` loads for Kimi-VL (``v.patch_embd``, ``v.position_embd``,
``v.blk.N.{ln1,attn_q,attn_k,attn_v,attn_out,ln2,ffn_up,ffn_down}``, ``v.post_ln``, ``mm.input_norm``, ``mm.1``,
``mm.2``). Nothing is decoded at open time: ``tensor`` returns a view of the memory map, the vision encoder decodes it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from .errors import GGUFFileError
from .gguf_file import GGUFFile, TensorInfo
from .image import ImageProcessorConfig

__all__ = ["MmprojError", "VisionHParams", "MmprojFile", "ROPE_LAYOUTS", "DEFAULT_IN_TOKEN_LIMIT"]

ROPE_LAYOUTS = ("ggml_split", "hf_interleaved")
"""Q/K row order within a head: ggml's split halves (column pairs, then row pairs) or MoonViT's interleaved pairs."""
DEFAULT_IN_TOKEN_LIMIT = 4096
"""Budget for files without ``kimivl_edge.vision.in_token_limit`` (llama.cpp-made): the Instruct / Thinking value of
``preprocessor_config.json`` (docs/model.md §4). Thinking-2506 uses 16384; pass ``max_patches`` or rebuild the file
with our converter to get it."""
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")

_OURS = "kimivl_edge."
_MAX_DIM = 1 << 24  # no Kimi-VL size comes near; larger values only make shape checks overflow into huge numbers


class MmprojError(GGUFFileError):
    """The file is not a usable Kimi-VL mmproj GGUF (one-line message)."""


@dataclass(frozen=True)
class VisionHParams:
    """MoonViT + projector hyper-parameters read from the file (docs/model.md §2, §11)."""

    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    patch_size: int
    layer_norm_eps: float
    pos_emb_height: int
    pos_emb_width: int
    projection_dim: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    in_token_limit: int | None
    pad_input: bool | None
    rope_layout: str
    projector_gelu: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merged_dim(self) -> int:
        """Projector input width: merge_size² patch vectors side by side (docs/model.md §6)."""
        return self.hidden_size * self.merge_size * self.merge_size


class MmprojFile:
    """A memory-mapped mmproj GGUF, validated as a Kimi-VL vision projector at open time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:  # a missing file, a directory, a truncated or foreign file: GGUFFile's one line
            self._file = GGUFFile(self.path)
        except GGUFFileError as e:
            raise MmprojError(str(e)) from None
        self._tensors = self._file.tensors
        try:
            self._check_kind()
            self.hparams = self._read_hparams()
            self._check_tensors()
        except MmprojError:
            self._file.close()
            raise

    # -- metadata -------------------------------------------------------------------------------------------------
    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value (scalar, string or numpy array), or ``default`` when the key is absent."""
        return self._file.get(key, default)

    def value_type(self, key: str) -> GGUFValueType | None:
        """The GGUF type a metadata value is stored in (None when the key is absent): llama.cpp reads each key in
        one type only."""
        t = self._file.types.get(key)
        return None if t is None else t[0]

    def _required(self, key: str) -> Any:
        v = self.value(key)
        if v is None:
            raise MmprojError(f"{self.path}: missing metadata key {key}")
        return v

    def _int(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        """An integer value (any GGUF integer type) in [lo, hi]; ``default`` when absent, if given."""
        v = self.value(key) if default is None else self.value(key, default)
        if v is None:
            raise MmprojError(f"{self.path}: missing metadata key {key}")
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise MmprojError(f"{self.path}: metadata {key} = {_short(v)} is not an integer in {lo}..{hi}")
        return v

    def _float(self, key: str, lo: float, hi: float) -> float:
        v = self._required(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and lo <= v <= hi):
            raise MmprojError(f"{self.path}: metadata {key} = {_short(v)} is not a number in {lo}..{hi}")
        return float(v)

    def _str(self, key: str, default: str) -> str:
        v = self.value(key, default)
        if not isinstance(v, str):
            raise MmprojError(f"{self.path}: metadata {key} = {_short(v)} is not a string")
        return v

    def _check_kind(self) -> None:
        arch = self.value("general.architecture")
        if not isinstance(arch, str) or arch != "clip":
            raise MmprojError(f"{self.path}: a {'unknown' if arch is None else _short(arch)}-architecture GGUF, not "
                              "a vision projector (mmproj) file")
        ptype = self.value("clip.projector_type")
        if not isinstance(ptype, str) or ptype != "kimivl":
            raise MmprojError(f"{self.path}: clip projector_type is {_short(ptype)}, expected 'kimivl' (not a "
                              "Kimi-VL mmproj)")
        if self.value("clip.has_vision_encoder", True) is not True:
            raise MmprojError(f"{self.path}: the file has no vision encoder")

    def _read_hparams(self) -> VisionHParams:
        """Every value in its type and in a range the encoder can use. Sizes are bounded by the tensor count
        (layers) or by what a tensor in this file could hold, so no hostile value makes a loop or table huge."""
        n = len(self._tensors)
        size = self._int
        hidden, heads = size("clip.vision.embedding_length", 1, _MAX_DIM), size("clip.vision.attention.head_count", 1,
                                                                                _MAX_DIM)
        if hidden % heads or (hidden // heads) % 4:
            raise MmprojError(f"{self.path}: {hidden} hidden / {heads} heads: the head dim must be a multiple of 4")
        layout = self._str(_OURS + "vision.rope_layout", "hf_interleaved")
        if layout not in ROPE_LAYOUTS:
            raise MmprojError(f"{self.path}: unknown {_OURS}vision.rope_layout {layout!r}")
        gelu = self._str(_OURS + "projector.gelu", "erf")
        if gelu != "erf":
            raise MmprojError(f"{self.path}: projector GELU {gelu!r} is not supported (Kimi-VL uses erf)")
        pos_h, pos_w = self._pos_grid()
        limit = self.value(_OURS + "vision.in_token_limit")
        pad = self.value(_OURS + "vision.pad_input")
        if pad is not None and not isinstance(pad, bool):
            raise MmprojError(f"{self.path}: metadata {_OURS}vision.pad_input = {_short(pad)} is not a boolean")
        return VisionHParams(
            hidden_size=hidden, num_heads=heads,
            num_layers=size("clip.vision.block_count", 1, n),  # every layer has 16 tensors
            intermediate_size=size("clip.vision.feed_forward_length", 1, _MAX_DIM),
            patch_size=size("clip.vision.patch_size", 1, _MAX_DIM),
            layer_norm_eps=self._float("clip.vision.attention.layer_norm_epsilon", 1e-12, 1.0),
            pos_emb_height=pos_h, pos_emb_width=pos_w,
            projection_dim=size("clip.vision.projection_dim", 1, _MAX_DIM),
            merge_size=size("clip.vision.projector.scale_factor", 2, 2, default=2),  # Kimi-VL merges 2x2
            image_mean=_triple(self._required("clip.vision.image_mean"), "image_mean", self.path),
            image_std=_triple(self._required("clip.vision.image_std"), "image_std", self.path, positive=True),
            in_token_limit=None if limit is None else size(_OURS + "vision.in_token_limit", 1, _MAX_DIM),
            pad_input=pad, rope_layout=layout, projector_gelu=gelu,
        )

    def _pos_grid(self) -> tuple[int, int]:
        """(H, W) of the pos-emb table: our keys, else the square root of its row count (llama.cpp assumes square)."""
        h, w = self.value(_OURS + "vision.pos_emb_height"), self.value(_OURS + "vision.pos_emb_width")
        if h is not None and w is not None:
            return (self._int(_OURS + "vision.pos_emb_height", 1, _MAX_DIM),
                    self._int(_OURS + "vision.pos_emb_width", 1, _MAX_DIM))
        t = self._tensors.get("v.position_embd.weight")
        if t is None:
            raise MmprojError(f"{self.path}: missing tensor v.position_embd.weight")
        rows = t.ne[1] if len(t.ne) > 1 else 1
        side = math.isqrt(rows)
        if side * side != rows:
            raise MmprojError(f"{self.path}: position table has {rows} rows, not a square grid")
        return side, side

    # -- tensors --------------------------------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Numpy shape of every tensor the encoder reads (docs/model.md §3.1, §3.2 under the GGUF names)."""
        hp = self.hparams
        d, f, p, m = hp.hidden_size, hp.intermediate_size, hp.patch_size, hp.merged_dim
        out: dict[str, tuple[int, ...]] = {
            "v.patch_embd.weight": (d, 3, p, p), "v.patch_embd.bias": (d,),
            "v.position_embd.weight": (hp.pos_emb_height * hp.pos_emb_width, d),
            "v.post_ln.weight": (d,), "v.post_ln.bias": (d,),
            "mm.input_norm.weight": (d,), "mm.input_norm.bias": (d,),
            "mm.1.weight": (m, m), "mm.1.bias": (m,),
            "mm.2.weight": (hp.projection_dim, m), "mm.2.bias": (hp.projection_dim,),
        }
        for i in range(hp.num_layers):
            b = f"v.blk.{i}."
            for norm in ("ln1", "ln2"):
                out[b + norm + ".weight"] = out[b + norm + ".bias"] = (d,)
            for lin, shape in (("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)), ("attn_out", (d, d)),
                               ("ffn_up", (f, d)), ("ffn_down", (d, f))):
                out[b + lin + ".weight"], out[b + lin + ".bias"] = shape, shape[:1]
        return out

    def _check_tensors(self) -> None:
        for name, shape in self.expected_shapes().items():
            t = self._tensors.get(name)
            if t is None:
                raise MmprojError(f"{self.path}: missing tensor {name}")
            got = self._numpy_shape(t)
            if got != shape:
                raise MmprojError(f"{self.path}: tensor {name} has shape {list(got)}, expected {list(shape)}")
            if t.type.name not in SUPPORTED_TYPES:
                raise MmprojError(f"{self.path}: tensor {name} is {t.type.name}; supported: "
                                  f"{', '.join(SUPPORTED_TYPES)}")

    @staticmethod
    def _numpy_shape(t: TensorInfo) -> tuple[int, ...]:
        """GGUF lists ggml ``ne`` (fastest axis first); numpy order is the reverse (docs/model.md §11)."""
        shape = t.shape
        while len(shape) > 1 and shape[0] == 1:  # a 1-D tensor may be stored with trailing ne = 1
            shape = shape[1:]
        return shape

    def tensor(self, name: str) -> tuple[np.ndarray, str, tuple[int, ...]]:
        """(raw data view of the memory map, ggml type name, numpy shape). No copy, no decoding."""
        t = self._tensors.get(name)
        if t is None:
            raise MmprojError(f"{self.path}: missing tensor {name}")
        return self._file.data(name), t.type.name, self._numpy_shape(t)

    # -- preprocessing -----------------------------------------------------------------------------------------
    def image_processor_config(self) -> ImageProcessorConfig:
        """The pixel pipeline's settings from the file (docs/model.md §4): mean/std from the clip keys, budget from
        ``kimivl_edge.vision.in_token_limit`` or ``DEFAULT_IN_TOKEN_LIMIT`` for llama.cpp-made files."""
        hp = self.hparams
        return ImageProcessorConfig(
            patch_size=hp.patch_size, merge_kernel_size=(hp.merge_size, hp.merge_size),
            in_token_limit=hp.in_token_limit if hp.in_token_limit is not None else DEFAULT_IN_TOKEN_LIMIT,
            image_mean=hp.image_mean, image_std=hp.image_std,
            pad_input=True if hp.pad_input is None else hp.pad_input)

    def __repr__(self) -> str:
        return f"MmprojFile({str(self.path)!r})"


def _triple(v: Any, key: str, path: Path, positive: bool = False) -> tuple[float, float, float]:
    many = isinstance(v, (list, tuple, np.ndarray))
    vals: list[Any] = [x.item() if isinstance(x, np.generic) else x for x in v] if many else [v] * 3
    ok = len(vals) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                and (x > 0 or not positive) for x in vals)
    if not ok:
        what = "positive numbers" if positive else "numbers"
        raise MmprojError(f"{path}: clip.vision.{key} must be three {what}, got {_short(v)}")
    return float(vals[0]), float(vals[1]), float(vals[2])


def _short(v: Any) -> str:
    """A metadata value for a one-line message (a hostile file's value can be a huge array or a long string)."""
    r = " ".join(repr(v).split())
    return r if len(r) <= 60 else r[:57] + "..."

