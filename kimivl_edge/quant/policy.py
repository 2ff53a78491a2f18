"""Per-tensor storage type choice for the converter (docs/model.md §11).

Two kinds of file types, both written in one pass by the converter (``convert.gguf_out``, encoding with ggml's
own C quantizer through ``quant.kernels``):

* ``F32`` / ``F16`` / ``BF16`` / ``Q8_0`` / ``Q4_0``: 1-D tensors, norms, ``ffn_gate_inp`` and ``exp_probs_b``
  stay F32, everything else gets the requested type, with the shape fallback.
* ``Q4_K_M`` / ``Q5_K_M`` / ``Q6_K`` (and our ``Q4_K_EDGE`` and ``IQ4_EDGE``: their base mix's rules, then ours,
  ``RECIPE_TYPES``), and the IQ mixes ``IQ4_XS`` / ``IQ4_NL`` / ``IQ3_S`` /
  ``IQ3_XXS`` / ``IQ2_XXS`` (with or without an importance matrix, which changes some of their types; the last two
  require one, ``requires_imatrix``): ``text_tensor_type`` reproduces llama.cpp's
  ``llama_tensor_get_type`` (src/llama-quant.cpp, llama.cpp vendored in llama-cpp-python 0.3.36) for the tensor
  names of a ``deepseek2`` text GGUF, i.e. the types ``llama_model_quantize`` would give each tensor of a BF16
  file of the same model; the converter quantizes straight to those types (no intermediate file), and a
  ``--dry-run`` plan prints every one of them. Arch-specific branches of other models (Falcon, LLaMA-70B, GLM-5,
  Bailing) and the mixes we do not offer (Q2_K, Q3_K_*, IQ1_*, IQ2_XS/S/M, IQ3_XS/M, ...) are not modelled.

``range_fallback`` is the one rule for a tensor whose values overflow its type (found while writing).

``ne`` arguments are in ggml order (``ne[0]`` = row length, the dimension blocks run along).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
from gguf import GGMLQuantizationType as GT

from . import codec
from .types import FType, FTypeLike, QType, QTypeLike, as_ftype, as_ggml, as_qtype, block_size

__all__ = [
    "fallback",
    "n_dims",
    "use_more_bits",
    "llama_allows_quantization",
    "tensor_category",
    "text_tensor_type",
    "recipe_class",
    "text_plan",
    "mmproj_tensor_type",
    "range_fallback",
    "MMPROJ_TYPES",
]

MMPROJ_TYPES = ("f32", "f16", "q8_0", "q4_0")

# tensor_type_fallback(): 256-block type -> the 32-block type llama.cpp demotes to when ne0 % 256 != 0.
_FALLBACK = {
    GT.IQ1_S: GT.IQ4_NL, GT.IQ1_M: GT.IQ4_NL, GT.IQ2_XXS: GT.IQ4_NL, GT.IQ2_XS: GT.IQ4_NL, GT.IQ2_S: GT.IQ4_NL,
    GT.IQ3_XXS: GT.IQ4_NL, GT.IQ3_S: GT.IQ4_NL, GT.IQ4_XS: GT.IQ4_NL,
    GT.Q2_K: GT.Q4_0, GT.Q3_K: GT.Q4_0, GT.TQ1_0: GT.Q4_0, GT.TQ2_0: GT.Q4_0,
    GT.Q4_K: GT.Q5_0, GT.Q5_K: GT.Q5_1, GT.Q6_K: GT.Q8_0,
}

# Substrings that make llama.cpp keep a tensor unquantized (tensor_allows_quantization, non-arch-specific part).
_NO_QUANT_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_NO_QUANT_EXACT = ("position_embd.weight", "token_types.weight")

# Q4_K_EDGE = Q4_K_M with two changes (full A3B text file 9.55 GB / 4.79 bits per weight against 10.53 GB / 5.28):
# * the routed experts' down projections, when their rows do not fit K-quant super-blocks (Kimi-VL's ffn_down_exps,
#   rows of 1408): llama.cpp demotes Q4_K -> Q5_0 (5.5 bits) and, in its use_more_bits layers, Q6_K -> Q8_0 (8.5
#   bits), 39 % of the file; here Q4_0 (4.5 bits, like Q4_K) and Q5_0 (5.5 bits, next below Q6_K's 6.56);
# * token_embd Q4_K -> Q8_0: one row is read per token, so these bits cost no decode bandwidth.
# Measured on the trained tiny model (mean KLD vs fp32, teacher-forced, 4 held-out sets of 60-200 questions): the
# down-projection change alone is 9-12 % above Q4_K_M; with token_embd at Q6_K the sets disagree (-22 % .. +14 %);
# with Q8_0 all four sets are below Q4_K_M (-16 % .. -73 %). IQ4_NL instead of Q4_0 measured no better (-13 % ..
# -62 %) and ggml quantizes it at 3 M weights per CPU-second against Q4_0's 250 M (14 min more for the full model).
# On the retrained tiny model (grounding added) the same recipe measures 1.37x Q4_K_M's KLD on one set of 200
# questions: the gain did not carry over. tests/test_quant_recipe.py bounds it at 1.5x.
EDGE_DOWN_TYPES = {GT.Q4_K: GT.Q4_0, GT.Q6_K: GT.Q5_0}
EDGE_TOKEN_EMBD = GT.Q8_0
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")

# Our recipes' types per tensor class (``recipe_class``), over their base mix's rules; the shape fallback still
# applies. IQ4_EDGE (issue 19's recipe target: <= 4.6 bits per weight at a3b size, KLD <= Q4_K_M's): IQ4_XS's
# routed experts (their down projections, rows of 1408, fall back to IQ4_NL; 90 % of A3B's weights) and every other
# weight at Q6_K (attention's k_b, rows of 128, falls back to Q8_0): 4.56 bits per weight at a3b with an imatrix,
# 4.60 without (IQ4_XS then gives the first ffn_down layers Q5_K), against Q4_K_M's 5.28. Chosen by
# `python -m training.quant_frontier --search` on held-out seed 1000 (100 questions) among per-class candidates
# within 4.6 bits as the one that fits with and without an imatrix (mean KLD 0.00063 without, 0.00048 with,
# Q4_K_M 0.00197; a candidate with attention Q8_0 and shared experts Q5_K measured 0.00043 with an imatrix but
# 4.62 bits without); reported on other seeds in docs/quant-frontier.md. On the tiny model the routed experts are
# 42 % of the weights, not 90 %, so the gain from the other classes' bits is larger there than it can be at a3b.
RECIPE_TYPES: dict[FType, dict[str, GT]] = {
    FType.IQ4_EDGE: {"attention": GT.Q6_K, "shared_experts": GT.Q6_K, "dense_ffn": GT.Q6_K, "token_embd": GT.Q6_K,
                     "output": GT.Q6_K},
}


def _public(t: GT) -> QType | GT:
    """Return our QType when the ggml type is one of ours, else the gguf enum member."""
    try:
        return as_qtype(t)
    except ValueError:
        return t


def n_dims(ne: Sequence[int]) -> int:
    """ggml_n_dims: number of dimensions after dropping trailing 1s (at least 1)."""
    n = len(ne)
    while n > 1 and int(ne[n - 1]) == 1:
        n -= 1
    return max(n, 1)


def fallback(qtype: QTypeLike, ne0: int) -> tuple[QType | GT, str]:
    """Shape fallback of llama.cpp's ``tensor_type_fallback`` (docs/model.md §11).

    If ``ne0`` is not a multiple of the block size: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K/TQ1_0/TQ2_0->Q4_0,
    IQ1*/IQ2*/IQ3*/IQ4_XS->IQ4_NL; a 32-block type stays; then F16 if the result still does not divide ``ne0``.
    Any other type with blocks > 32 has no fallback (ValueError, as llama.cpp throws). Returns (type, reason),
    reason "" when no fallback was needed.
    """
    t = as_ggml(qtype)
    bs = block_size(t)
    if ne0 % bs == 0:
        return _public(t), ""
    reason = f"ne0 {ne0} not a multiple of {bs} ({t.name})"
    if t in _FALLBACK:
        t2 = _FALLBACK[t]
    elif bs <= 32:
        t2 = t
    else:
        raise ValueError(f"{reason}: llama.cpp defines no fallback for {t.name}")
    if ne0 % block_size(t2) != 0:
        if t2 != t:
            reason += f" -> {t2.name}, ne0 not a multiple of {block_size(t2)} either"
        t2 = GT.F16
    return _public(t2), f"{reason} -> {t2.name}"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer rule: first 1/8, last 1/8, and every third layer in between (C integer arithmetic)."""
    mid = i_layer - n_layers // 8
    c_mod = mid - 3 * int(mid / 3)  # C '%' truncates toward zero
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or c_mod == 2


def llama_allows_quantization(gguf_name: str, ne: Sequence[int]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` (default params, non-arch-specific rules): 2-D/3-D tensors whose
    name ends in ``weight`` and is not a norm, router, positional embedding, conv patch embedding, ..."""
    if n_dims(ne) < 2 or not gguf_name.endswith("weight"):
        return False
    if gguf_name in _NO_QUANT_EXACT:
        return False
    return not any(s in gguf_name for s in _NO_QUANT_SUBSTRINGS)


def tensor_category(gguf_name: str) -> str:
    """llama.cpp's ``tensor_get_category`` (substring tests in its order). Note ``attn_k_b``/``attn_v_b`` are
    OTHER (only the legacy fused ``attn_kv_b`` counts as attn_v-like)."""
    if gguf_name == "output.weight":
        return "OUTPUT"
    if gguf_name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "TOKEN_EMBD"
    for key, cat in (("attn_qkv.weight", "ATTENTION_QKV"), ("attn_kv_b.weight", "ATTENTION_KV_B"),
                     ("attn_v.weight", "ATTENTION_V"), ("attn_k.weight", "ATTENTION_K"),
                     ("attn_q.weight", "ATTENTION_Q"), ("attn_output.weight", "ATTENTION_OUTPUT"),
                     ("ffn_up", "FFN_UP"), ("ffn_gate", "FFN_GATE"), ("ffn_down", "FFN_DOWN")):
        if key in gguf_name:
            return cat
    return "OTHER"


def recipe_class(gguf_name: str) -> str:
    """The tensor classes our recipes choose types for: token_embd, output, attention, dense_ffn, shared_experts,
    routed_experts (gate and up), routed_down; "other" for the rest (norms, router)."""
    if gguf_name in ("token_embd.weight", "output.weight"):
        return gguf_name.split(".")[0]
    if "_exps." in gguf_name:
        return "routed_down" if "ffn_down" in gguf_name else "routed_experts"
    if "_shexp." in gguf_name:
        return "shared_experts"
    if re.search(r"\.ffn_(gate|up|down)\.", gguf_name):
        return "dense_ffn"
    if ".attn_" in gguf_name and "_norm." not in gguf_name:
        return "attention"
    return "other"


def _is_attn_v_like(cat: str) -> bool:
    return cat in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B")


def _layer_of(gguf_name: str, n_layers: int) -> int:
    m = _LAYER_RE.match(gguf_name)
    if m is None:
        raise ValueError(f"cannot determine the layer of tensor {gguf_name}")
    i = int(m.group(1))
    if not 0 <= i < n_layers:
        raise ValueError(f"bad layer {i} for tensor {gguf_name}; must be in [0, {n_layers})")
    return i


def _own_type(gguf_name: str, ne: Sequence[int], ft: FType) -> tuple[QType, str]:
    """Our converter's rule for F32/F16/BF16/Q8_0/Q4_0 text files."""
    if n_dims(ne) < 2:
        return QType.F32, "1-D tensor kept F32"
    if "_norm." in gguf_name or gguf_name.endswith("_norm"):
        return QType.F32, "norm kept F32"
    if "ffn_gate_inp" in gguf_name:
        return QType.F32, "router ffn_gate_inp kept F32"
    if "exp_probs_b" in gguf_name:
        return QType.F32, "exp_probs_b kept F32"
    t, why = fallback(ft.default_qtype, int(ne[0]))
    return as_qtype(t), why or f"requested {ft.value}"


# llama.cpp's tensor_requires_imatrix: these types are refused without an importance matrix (token_embd and output
# excepted; Q2_K only in a Q2_K_S file, which we do not make).
REQUIRES_IMATRIX = frozenset({GT.IQ3_XXS, GT.IQ2_XXS, GT.IQ2_XS, GT.IQ2_S, GT.IQ1_M, GT.IQ1_S})
# the mixes whose attn_output gets Q5_K in an 8-expert model (llama_tensor_get_type_impl)
_ATTN_OUTPUT_Q5K_WITH_8_EXPERTS = (FType.Q4_K_M, FType.IQ4_NL, FType.IQ4_XS, FType.IQ3_S,
                                   FType.IQ3_XXS)


def _output_rule(ne0: int, ft: FType, default: GT, tag: str) -> tuple[GT, str]:
    """output.weight (and a tied token_embd): Q8_0 when the row does not fit the mix's blocks, Q5_K for the 2- and
    3-bit XXS IQ mixes, else Q6_K."""
    if ne0 % block_size(default) != 0:
        return GT.Q8_0, f"{tag}: ne0 {ne0} not a multiple of {block_size(default)} -> Q8_0"
    if ft in (FType.IQ2_XXS, FType.IQ3_XXS):
        return GT.Q5_K, f"{tag} in {ft.value} -> Q5_K"
    if default != GT.Q8_0:
        return GT.Q6_K, f"{tag} -> Q6_K"
    return default, ""


def _iq2_rule(cat: str, n_layers: int, n_expert: int, n_gqa: int, i_ffn_down: int) -> tuple[GT | None, str]:
    """The 2-bit IQ mixes' branch (IQ2_XXS): attn_v-like Q4_K (Q2_K with n_gqa and n_expert below 4), the first
    n_layers/8 ffn_down tensors (counted in llama.cpp's order, experts and shared experts each) Q2_K, attn_k and
    attn_output of an 8-expert model Q4_K / Q5_K."""
    if _is_attn_v_like(cat):
        if n_gqa >= 4 or n_expert >= 4:
            return GT.Q4_K, "attn_v-like in a 2-bit IQ mix -> Q4_K"
        return GT.Q2_K, "attn_v-like in a 2-bit IQ mix -> Q2_K"
    if cat == "ATTENTION_K" and n_expert == 8:
        return GT.Q4_K, "attn_k with 8 experts -> Q4_K"
    if cat == "FFN_DOWN" and i_ffn_down < n_layers // 8:
        return GT.Q2_K, f"ffn_down #{i_ffn_down} < {n_layers // 8} in a 2-bit IQ mix -> Q2_K"
    if cat == "ATTENTION_OUTPUT" and n_expert == 8:
        return GT.Q5_K, "attn_output with 8 experts -> Q5_K"
    return None, ""


def _mix_rule(gguf_name: str, ne: Sequence[int], ft: FType, n_layers: int, n_expert: int, tied_embeddings: bool,
              i_attn_v: int, n_attn_v: int, has_imatrix: bool, i_ffn_down: int, n_gqa: int
              ) -> tuple[GT, list[str]]:
    """The branches of llama_tensor_get_type_impl reachable for our mixes (before the shape fallback)."""
    default = ft.default_qtype.ggml
    t = default
    why: list[str] = [f"{ft.value} default {t.name}"]

    def to(new: GT | None, reason: str) -> None:
        nonlocal t
        if new is not None:
            t = new
            why.append(reason)
    cat = tensor_category(gguf_name)
    if cat == "OUTPUT" or (tied_embeddings and cat == "TOKEN_EMBD"):
        to(*_output_rule(int(ne[0]), ft, default, "output" if cat == "OUTPUT" else "tied token_embd"))
    elif cat == "TOKEN_EMBD":
        if ft == FType.IQ2_XXS:
            to(GT.Q2_K, "token_embd in a 2-bit IQ mix -> Q2_K")
        elif ft == FType.IQ3_XXS:
            to(GT.IQ3_S, "token_embd in IQ3_XXS -> IQ3_S")
    elif ft == FType.IQ2_XXS:
        to(*_iq2_rule(cat, n_layers, n_expert, n_gqa, i_ffn_down))
    elif _is_attn_v_like(cat):
        if ft == FType.IQ3_XXS:
            to(GT.Q4_K if n_gqa >= 4 else GT.IQ3_XXS if has_imatrix else GT.IQ3_S, "attn_v-like in IQ3_XXS")
        elif ft == FType.IQ3_S and n_gqa >= 4:
            to(GT.Q4_K, "attn_v-like in IQ3_S with n_gqa >= 4 -> Q4_K")
        elif ft in (FType.IQ4_NL, FType.IQ4_XS) and n_gqa >= 4:
            to(GT.Q5_K, f"attn_v-like in {ft.value} with n_gqa >= 4 -> Q5_K")
        elif ft in (FType.Q4_K_M, FType.Q5_K_M) and use_more_bits(i_attn_v, n_attn_v):
            to(GT.Q6_K, f"attn_v-like #{i_attn_v}/{n_attn_v} use_more_bits -> Q6_K")
        if n_expert == 8:
            to(GT.Q8_0, "attn_v-like with 8 experts -> Q8_0")
    elif cat == "ATTENTION_K":
        if n_expert == 8:
            to(GT.Q8_0, "attn_k with 8 experts -> Q8_0")
        elif ft == FType.IQ3_XXS:
            to(GT.IQ2_S, "attn_k in IQ3_XXS -> IQ2_S")
    elif cat == "ATTENTION_Q":
        if ft == FType.IQ3_XXS:
            to(GT.IQ2_S, "attn_q in IQ3_XXS -> IQ2_S")
    elif cat == "FFN_DOWN":
        i = _layer_of(gguf_name, n_layers)
        if ft == FType.IQ3_XXS and not has_imatrix:
            to(GT.Q4_K if i < n_layers // 8 else GT.Q3_K, f"ffn_down layer {i} in IQ3_XXS without imatrix")
        elif ft == FType.Q4_K_M:
            if use_more_bits(i, n_layers):
                to(GT.Q6_K, f"ffn_down layer {i}/{n_layers} use_more_bits -> Q6_K")
        elif i < n_layers // 8 and ft in (FType.IQ4_NL, FType.IQ4_XS) and not has_imatrix:
            to(GT.Q5_K, f"ffn_down layer {i} < {n_layers // 8} in {ft.value} without imatrix -> Q5_K")
        elif ft == FType.Q5_K_M and use_more_bits(i, n_layers):
            to(GT.Q6_K, f"ffn_down layer {i}/{n_layers} use_more_bits -> Q6_K")
    elif cat == "ATTENTION_OUTPUT":
        if n_expert == 8:
            if ft in _ATTN_OUTPUT_Q5K_WITH_8_EXPERTS:
                to(GT.Q5_K, "attn_output with 8 experts -> Q5_K")
        elif ft == FType.IQ3_XXS:
            to(GT.IQ3_S, "attn_output in IQ3_XXS -> IQ3_S")
    elif cat in ("FFN_GATE", "FFN_UP") and n_expert > 1:
        _layer_of(gguf_name, n_layers)  # llama.cpp parses (and validates) the layer here too
    return t, why


def requires_imatrix(gguf_name: str, qtype: QTypeLike) -> bool:
    """llama.cpp's ``tensor_requires_imatrix`` for a tensor planned as ``qtype``."""
    if gguf_name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return as_ggml(qtype) in REQUIRES_IMATRIX


def text_tensor_type(gguf_name: str, ne: Sequence[int], ftype: FTypeLike, n_layers: int, *, n_expert: int = 0,
                     tied_embeddings: bool = False, attn_v_index: int = 0, n_attn_v: int = 0,
                     src_ftype: FTypeLike = FType.F16, has_imatrix: bool = False,
                     ffn_down_index: int = 0, n_gqa: int = 1) -> tuple[QType, str]:
    """Final storage type of one tensor of a deepseek2 text GGUF, and why.

    ``gguf_name`` is the full GGUF name (``blk.5.ffn_down_exps.weight``), ``ne`` its ggml shape, ``n_layers`` the
    GGUF ``block_count``, ``n_expert`` ``expert_count``. For K-quant mixes the result is what
    ``llama_model_quantize`` would produce from a ``src_ftype`` file of the model (tensors llama.cpp does not
    quantize keep that file's type; the converter passes BF16, the checkpoint's own type, and writes the result
    directly); ``tied_embeddings`` means there is no ``output.weight``.
    ``attn_v_index``/``n_attn_v`` only matter for attn_v-like tensors (legacy fused ``attn_kv_b``): their
    position among those tensors in llama.cpp's order; ``ffn_down_index`` (the 2-bit IQ mixes) likewise among the
    ffn_down tensors. Use ``text_plan`` to get those counters right. ``has_imatrix``: quantized with an importance
    matrix (the IQ mixes then keep their type in the first ffn_down layers). ``n_gqa``: head_count / head_count_kv
    (the IQ mixes' attn_v-like rules; an MLA file stores head_count_kv 1).
    """
    if not (gguf_name.endswith(".weight") or gguf_name.endswith(".bias")):
        raise ValueError(f"expected a full GGUF tensor name ending in .weight/.bias, got {gguf_name!r}")
    ft = as_ftype(ftype)
    if not ft.is_kquant_mix:
        return _own_type(gguf_name, ne, ft)
    src = as_ftype(src_ftype)
    if src not in (FType.F32, FType.F16, FType.BF16):
        raise ValueError(f"the source type of a K-quant mix must be F32/F16/BF16, not {src.value}")
    if not llama_allows_quantization(gguf_name, ne):
        own, own_why = _own_type(gguf_name, ne, src)
        return own, f"not quantized by llama.cpp; {own_why}"
    t, why = _mix_rule(gguf_name, ne, ft.base, n_layers, n_expert, tied_embeddings, attn_v_index, n_attn_v, has_imatrix,
                       ffn_down_index, n_gqa)
    if ft == FType.Q4_K_EDGE and tensor_category(gguf_name) == "TOKEN_EMBD" and t == GT.Q4_K:
        why.append(f"edge: token_embd -> {EDGE_TOKEN_EMBD.name} (one row read per token)")
        t = EDGE_TOKEN_EMBD
    if (ft == FType.Q4_K_EDGE and "ffn_down_exps" in gguf_name and t in EDGE_DOWN_TYPES
            and int(ne[0]) % block_size(t) != 0):
        why.append(f"edge: ne0 {ne[0]} not a multiple of {block_size(t)} -> {EDGE_DOWN_TYPES[t].name} "
                   f"(llama.cpp: {fallback(t, int(ne[0]))[0].name})")
        t = EDGE_DOWN_TYPES[t]
    chosen = RECIPE_TYPES.get(ft, {}).get(recipe_class(gguf_name))
    if chosen is not None and chosen != t:
        why.append(f"{ft.value.lower()}: {recipe_class(gguf_name)} -> {chosen.name}")
        t = chosen
    t2, fb = fallback(t, int(ne[0]))
    if fb:
        why.append(f"fallback: {fb}")
    return as_qtype(t2), "; ".join(why)


def _llama_order_key(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: by ``blk.N.`` layer (non-layer tensors first), then by name."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)) if m else -1, name)


def text_plan(tensors: Iterable[tuple[str, Sequence[int]]], ftype: FTypeLike, n_layers: int, *,
              n_expert: int = 0, src_ftype: FTypeLike = FType.F16, has_imatrix: bool = False,
              n_gqa: int = 1) -> dict[str, tuple[QType, str]]:
    """``text_tensor_type`` for a whole file: ``tensors`` are (gguf_name, ne) pairs. Derives tied embeddings (no
    ``output.weight``) and the attn_v-like and ffn_down counters in llama.cpp's tensor order; returns
    {name: (type, reason)} in that order."""
    items = sorted(((str(n), tuple(int(x) for x in ne)) for n, ne in tensors), key=lambda x: _llama_order_key(x[0]))
    names = [n for n, _ in items]
    tied = "output.weight" not in names
    n_attn_v = sum(_is_attn_v_like(tensor_category(n)) for n in names)
    plan: dict[str, tuple[QType, str]] = {}
    i_attn_v = i_ffn_down = 0
    mix = as_ftype(ftype).is_kquant_mix
    for name, ne in items:
        plan[name] = text_tensor_type(name, ne, ftype, n_layers, n_expert=n_expert, tied_embeddings=tied,
                                      attn_v_index=i_attn_v, n_attn_v=n_attn_v, src_ftype=src_ftype,
                                      has_imatrix=has_imatrix, ffn_down_index=i_ffn_down, n_gqa=n_gqa)
        quantized = mix and llama_allows_quantization(name, ne)
        i_attn_v += quantized and _is_attn_v_like(tensor_category(name))
        i_ffn_down += quantized and tensor_category(name) == "FFN_DOWN"
    return plan


def mmproj_tensor_type(gguf_name: str, ne: Sequence[int], mtype: str) -> tuple[QType, str]:
    """Storage type of one mmproj (clip) tensor for ``mtype`` in f32/f16/q8_0/q4_0 (docs/model.md §11).

    1-D tensors and norms F32; ``v.position_embd`` F32; ``v.patch_embd`` F16 (F32 for an f32 file); everything
    else the requested type with the shape fallback (vision ``ffn_down``, ne0 4304, -> F16).
    """
    m = mtype.lower()
    if m not in MMPROJ_TYPES:
        raise ValueError(f"unsupported mmproj type {mtype!r}; expected one of {', '.join(MMPROJ_TYPES)}")
    want = as_qtype(m)
    if n_dims(ne) < 2:
        return QType.F32, "1-D tensor kept F32"
    if "norm" in gguf_name or re.search(r"(^|\.)(ln\d*|post_ln|pre_ln)\.", gguf_name):
        return QType.F32, "norm kept F32"
    if "position_embd" in gguf_name:
        return QType.F32, "position embedding kept F32"
    if "patch_embd" in gguf_name:
        return (QType.F32, "patch embedding F32") if want == QType.F32 else (QType.F16, "patch embedding F16")
    t, why = fallback(want, int(ne[0]))
    return as_qtype(t), why or f"requested {m.upper()}"


def range_fallback(qtype: QTypeLike, amax: float, *, bf16_ok: bool = True) -> tuple[QType, str]:
    """The type a tensor is written in when its values overflow ``qtype`` (``amax`` = max |x| over its finite
    values): BF16 if ``bf16_ok`` and BF16 holds ``amax``, else F32; and why. The converter's one rule for both files
    (``convert.gguf_out.write_gguf`` applies it while writing: text BF16, mmproj F32)."""
    t = as_qtype(qtype)
    alt = QType.BF16 if bf16_ok and t != QType.BF16 and codec.fits_type(np.array([amax], np.float32),
                                                                          QType.BF16) else QType.F32
    return alt, f"max |x| {amax:.6g} overflows {t.value} -> {alt.value}"
