"""The mmproj GGUF (arch ``clip``, projector ``kimivl``): MoonViT + 2x2 merge + MLP projector for llama.cpp's mtmd.

Metadata: the ``clip.*`` keys llama.cpp's own converter writes for Kimi-VL (``conversion/kimivl.py`` on top of
``MmprojModel.set_gguf_parameters``; docs/model.md §11), plus ``kimivl_edge.*`` keys for what llama.cpp does not
record: the preprocessing budget, the pos-emb grid, the projector GELU and the Q/K row layout.

Tensors (docs/model.md §3.1, §3.2 -> the names ``tools/mtmd/clip.cpp`` loads for ``PROJECTOR_TYPE_KIMIVL``):

    patch_embed.proj.weight / .bias     -> v.patch_embd.weight (numpy [C, 3, p, p]: ggml_conv_2d's kernel) / .bias
    patch_embed.pos_emb.weight [H,W,C]  -> v.position_embd.weight [H*W, C] (row-major over the grid)
    blocks.N.norm0 / norm1              -> v.blk.N.ln1 / ln2
    blocks.N.wqkv (rows Q | K | V)      -> v.blk.N.attn_q / attn_k / attn_v  (Q, K rows permuted, see below)
    blocks.N.wo                         -> v.blk.N.attn_out
    blocks.N.mlp.fc0 / fc1              -> v.blk.N.ffn_up / ffn_down
    encoder.final_layernorm             -> v.post_ln
    multi_modal_projector.pre_norm      -> mm.input_norm
    multi_modal_projector.linear_1 / _2 -> mm.1 / mm.2

RoPE layout (docs/model.md §5.4, §10.2a). MoonViT rotates adjacent pairs: in each head, pair (4i, 4i+1) by the
column, pair (4i+2, 4i+3) by the row. llama.cpp's ``build_rope_2d`` rotates the first half of each head by the
column and the second half by the row. By default (``rope_layout="ggml_split"``) the Q and K rows (weights and
biases, not V) are permuted per head so the two agree: new rows = old (4i, 4i+1) for i = 0..d/4-1, then old
(4i+2, 4i+3); ``kimivl_edge.vision.rope_layout = "ggml_split"`` records it. ``rope_layout="hf_interleaved"`` keeps
the checkpoint's order and writes no such key, exactly as llama.cpp's converter does (whose files are therefore
wrong for 34 of 36 pairs).

Types: ``quant.policy.mmproj_tensor_type`` (1-D and norms F32, position embedding F32, patch embedding F16/F32, the
rest the requested type with the ggml shape fallback). A tensor whose values do not survive the chosen type (F16
overflow, or an overflowing F16 block scale) is found while writing, as for the text file, and written F32
(``gguf_out.write_gguf`` reports it).
"""
from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
from gguf import Keys

from ..checkpoint import Checkpoint
from ..gguf_keys import EdgeKeys
from ..image import ImageProcessorConfig
from ..quant.policy import MMPROJ_TYPES, mmproj_tensor_type
from ..quant.types import QType, as_ftype
from .gguf_out import GGUFPlan, PlannedTensor, whole

__all__ = ["ROPE_LAYOUTS", "mmproj_plan", "mmproj_metadata", "ggml_split_order", "permute_qk_rows"]

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"
PROJECTOR_TYPE = gguf.VisionProjectorType.KIMIVL
ROPE_LAYOUTS = ("ggml_split", "hf_interleaved")
TOWER = "vision_tower."
BLOCK = TOWER + "encoder.blocks.{}."
PROJ = "multi_modal_projector."


# ---------------------------------------------------------------------------------------------------------------
# §5.4 Q/K row permutation

def ggml_split_order(head_dim: int) -> np.ndarray:
    """Old row of each new row within one head (docs/model.md §5.4): (4i, 4i+1) for all i, then (4i+2, 4i+3)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    return np.arange(head_dim).reshape(head_dim // 4, 2, 2).transpose(1, 0, 2).reshape(-1)


def permute_qk_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """Apply ``ggml_split_order`` to every head of a Q or K weight [heads*d, in] or bias [heads*d] (axis 0)."""
    d = a.shape[0] // n_heads
    if d * n_heads != a.shape[0]:
        raise ValueError(f"{a.shape[0]} rows do not split into {n_heads} heads")
    rows = (np.arange(n_heads)[:, None] * d + ggml_split_order(d)[None, :]).reshape(-1)
    return np.ascontiguousarray(a[rows])


# ---------------------------------------------------------------------------------------------------------------
# metadata

def mmproj_metadata(ckpt: Checkpoint, mtype: str, rope_layout: str = "ggml_split") -> dict[str, tuple]:
    """The mmproj's metadata (key -> (value, None)): llama.cpp's clip keys for Kimi-VL, then ours (docs/model.md §11).

    ``clip.vision.image_size`` = init_pos_emb_height x patch (896 for the real model, which llama.cpp hard-codes
    as 64*14); mean/std come from preprocessor_config.json; projection_dim is the text hidden size.
    """
    v, t = ckpt.config.vision, ckpt.config.text
    pre = ImageProcessorConfig.from_checkpoint(ckpt.path)
    V = Keys.ClipVision
    kv: dict[str, tuple] = {
        Keys.General.TYPE: (gguf.GGUFType.MMPROJ, None),
        Keys.General.FILE_TYPE: (as_ftype(mtype).llama_ftype, None),
        Keys.General.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, None),
        Keys.Clip.HAS_VISION_ENCODER: (True, None),
        V.PROJECTION_DIM: (t.hidden_size, None),
        V.IMAGE_SIZE: (v.init_pos_emb_height * v.patch_size, None),
        V.PATCH_SIZE: (v.patch_size, None),
        V.EMBEDDING_LENGTH: (v.hidden_size, None),
        V.FEED_FORWARD_LENGTH: (v.intermediate_size, None),
        V.BLOCK_COUNT: (v.num_hidden_layers, None),
        V.Attention.HEAD_COUNT: (v.num_attention_heads, None),
        V.IMAGE_MEAN: ([float(x) for x in pre.image_mean], None),
        V.IMAGE_STD: ([float(x) for x in pre.image_std], None),
        Keys.Clip.PROJECTOR_TYPE: (PROJECTOR_TYPE, None),
        V.USE_GELU: (True, None),
        V.Projector.SCALE_FACTOR: (v.merge_kernel_size[0], None),
        V.Attention.LAYERNORM_EPS: (float(v.layer_norm_eps), None),
        EdgeKeys.Vision.IN_TOKEN_LIMIT: (pre.in_token_limit, None),
        EdgeKeys.Vision.PAD_INPUT: (bool(pre.pad_input), None),
        EdgeKeys.Vision.POS_EMB_HEIGHT: (v.init_pos_emb_height, None),
        EdgeKeys.Vision.POS_EMB_WIDTH: (v.init_pos_emb_width, None),
        EdgeKeys.Projector.GELU: ("erf", None),  # docs/model.md §6 (llama.cpp's graph uses tanh, §10.2e)
    }
    if rope_layout == "ggml_split":
        kv[EdgeKeys.Vision.ROPE_LAYOUT] = ("ggml_split", None)
    return kv


# ---------------------------------------------------------------------------------------------------------------
# tensors

Maker = Callable[[], np.ndarray]


def _whole(ckpt: Checkpoint, name: str) -> Maker:
    return lambda: ckpt.float32(name)


def _pos_emb(ckpt: Checkpoint, name: str) -> Maker:
    """[H, W, C] -> [H*W, C]: row r, column c at index r*W + c, the order of the patches (docs/model.md §5.2)."""
    def make() -> np.ndarray:
        a = ckpt.float32(name)
        return a.reshape(a.shape[0] * a.shape[1], a.shape[2])
    return make


def _qkv_part(ckpt: Checkpoint, name: str, part: int, hidden: int, n_heads: int, permute: bool) -> Maker:
    """Rows [part*hidden, (part+1)*hidden) of ``wqkv`` (0 = Q, 1 = K, 2 = V; docs/model.md §3.4), Q/K permuted."""
    def make() -> np.ndarray:
        a = ckpt.float32(name)[part * hidden:(part + 1) * hidden]
        if permute and part < 2:
            return permute_qk_rows(a, n_heads)
        return np.ascontiguousarray(a)
    return make


def _tensor_sources(ckpt: Checkpoint, permute: bool) -> list[tuple[str, tuple[int, ...], Maker, tuple[str, ...]]]:
    """(gguf name, numpy shape, make, HF sources) for every mmproj tensor, in file order."""
    v, t = ckpt.config.vision, ckpt.config.text
    D, F, p, M = v.hidden_size, v.intermediate_size, v.patch_size, v.hidden_size * v.merge_area
    out: list[tuple[str, tuple[int, ...], Maker, tuple[str, ...]]] = []

    def same(gname: str, hf: str, shape: tuple[int, ...]) -> None:
        out.append((gname, shape, _whole(ckpt, hf), (hf,)))

    same("v.patch_embd.weight", TOWER + "patch_embed.proj.weight", (D, 3, p, p))
    same("v.patch_embd.bias", TOWER + "patch_embed.proj.bias", (D,))
    pos = TOWER + "patch_embed.pos_emb.weight"
    out.append(("v.position_embd.weight", (v.init_pos_emb_height * v.init_pos_emb_width, D), _pos_emb(ckpt, pos),
                (pos,)))
    for i in range(v.num_hidden_layers):
        b, g = BLOCK.format(i), f"v.blk.{i}."
        for suffix in ("weight", "bias"):
            same(g + "ln1." + suffix, b + "norm0." + suffix, (D,))
        for part, short in enumerate(("attn_q", "attn_k", "attn_v")):
            for suffix, shape in (("weight", (D, D)), ("bias", (D,))):
                hf = b + "wqkv." + suffix
                out.append((g + short + "." + suffix, shape,
                            _qkv_part(ckpt, hf, part, D, v.num_attention_heads, permute), (hf,)))
        same(g + "attn_out.weight", b + "wo.weight", (D, D))
        same(g + "attn_out.bias", b + "wo.bias", (D,))
        for suffix in ("weight", "bias"):
            same(g + "ln2." + suffix, b + "norm1." + suffix, (D,))
        same(g + "ffn_up.weight", b + "mlp.fc0.weight", (F, D))
        same(g + "ffn_up.bias", b + "mlp.fc0.bias", (F,))
        same(g + "ffn_down.weight", b + "mlp.fc1.weight", (D, F))
        same(g + "ffn_down.bias", b + "mlp.fc1.bias", (D,))
    for suffix in ("weight", "bias"):
        same("v.post_ln." + suffix, TOWER + "encoder.final_layernorm." + suffix, (D,))
    for suffix in ("weight", "bias"):
        same("mm.input_norm." + suffix, PROJ + "pre_norm." + suffix, (D,))
    same("mm.1.weight", PROJ + "linear_1.weight", (M, M))
    same("mm.1.bias", PROJ + "linear_1.bias", (M,))
    same("mm.2.weight", PROJ + "linear_2.weight", (t.hidden_size, M))
    same("mm.2.bias", PROJ + "linear_2.bias", (t.hidden_size,))
    return out


def _planned_type(gname: str, shape: tuple[int, ...], mtype: str) -> tuple[QType, str]:
    """Policy type and why (docs/model.md §11); a range fallback is the writer's to find."""
    qtype, why = mmproj_tensor_type(gname, tuple(reversed(shape)), mtype)
    return qtype, f"fallback: {why}" if why.startswith("ne0 ") else f"policy: {why}"


def mmproj_plan(ckpt: Checkpoint, mtype: str, extra_kv: dict | None = None, *,
                rope_layout: str = "ggml_split") -> GGUFPlan:
    """The whole mmproj file for ``mtype`` in f32/f16/q8_0/q4_0. No tensor is read here: each is read from the
    checkpoint when the writer asks for its ``blocks()``.

    ``extra_kv`` (key -> (value, GGUFValueType or None)) adds metadata, e.g. ``general.name``; its keys come right
    after ``general.type`` and win over ours on a clash. ``rope_layout`` is "ggml_split" (Q/K permuted for
    llama.cpp's 2-D RoPE, docs/model.md §5.4) or "hf_interleaved" (the checkpoint's order, as llama.cpp's converter).
    """
    m = mtype.lower()
    if m not in MMPROJ_TYPES:
        raise ValueError(f"unsupported mmproj type {mtype!r}; expected one of {', '.join(MMPROJ_TYPES)}")
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"unknown rope_layout {rope_layout!r}; expected one of {', '.join(ROPE_LAYOUTS)}")
    ours = mmproj_metadata(ckpt, m, rope_layout)
    extra = dict(extra_kv or {})
    kv = {Keys.General.TYPE: ours.pop(Keys.General.TYPE)} | extra
    kv |= {k: val for k, val in ours.items() if k not in extra}
    tensors = tuple(PlannedTensor(gname, shape, *_planned_type(gname, shape, m), blocks=whole(make, shape),
                                  sources=sources)
                    for gname, shape, make, sources in _tensor_sources(ckpt, permute=rope_layout == "ggml_split"))
    return GGUFPlan(ARCH, kv, tensors, bf16_fallback=False)
