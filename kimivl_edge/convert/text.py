"""The text GGUF: the MoE decoder in llama.cpp's ``deepseek2`` layout (docs/model.md §3.3, §3.4, §9.4, §11).

Tensor transforms (numpy shapes; ggml ne is the reverse):
  embed_tokens -> token_embd, lm_head -> output (untied), model.norm -> output_norm;
  per layer: input_layernorm -> attn_norm, post_attention_layernorm -> ffn_norm, q_proj -> attn_q,
  kv_a_proj_with_mqa -> attn_kv_a_mqa, kv_a_layernorm -> attn_kv_a_norm,
  kv_b_proj [H*(nope+v), r] -> attn_k_b [H, r, nope] (W_UK per head, transposed) + attn_v_b [H, v, r],
  o_proj -> attn_output; dense layer: mlp.{gate,up,down}_proj -> ffn_{gate,up,down};
  MoE layers: mlp.gate -> ffn_gate_inp, e_score_correction_bias -> exp_probs_b.bias, experts stacked into
  ffn_{gate,up,down}_exps [E, ...], shared_experts -> ffn_{gate,up,down}_shexp; rotary_emb.inv_freq dropped.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import gguf
import numpy as np
from gguf import Keys

from ..checkpoint import Checkpoint
from ..config import TextConfig
from ..gguf_keys import EdgeKeys
from ..quant import policy
from ..quant.imatrix_file import Imatrix, weights_for
from ..quant.types import FType, QType, as_ftype, nbytes
from .gguf_out import SLICE_BYTES, Block, GGUFPlan, PlannedTensor, Weighted, whole

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]


@dataclass(frozen=True)
class TextTensor:
    """One tensor of the text GGUF: its GGUF name, numpy shape, the HF tensors it is built from, and how."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    how: str = "copy"  # "copy" (one source), "stack" (routed experts along a new first axis), "k_b" / "v_b"


def text_tensors(t: TextConfig) -> list[TextTensor]:
    """Every text tensor in llama.cpp's converter order, from the config alone: the checkpoint plan, and the sizes
    and type plans of the full model without its 32 GB of weights (``text_bytes``)."""
    H, r, E = t.num_attention_heads, t.kv_lora_rank, t.n_routed_experts
    D, FE, S = t.hidden_size, t.moe_intermediate_size, t.moe_intermediate_size * t.n_shared_experts
    nope, rope, vd = t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim
    M = "language_model.model."
    out = [TextTensor("token_embd.weight", (t.vocab_size, D), (M + "embed_tokens.weight",))]
    for i in range(t.num_hidden_layers):
        b, L = f"blk.{i}.", f"{M}layers.{i}."
        kvb = (L + "self_attn.kv_b_proj.weight",)
        out += [TextTensor(b + "attn_norm.weight", (D,), (L + "input_layernorm.weight",)),
                TextTensor(b + "attn_q.weight", (H * (nope + rope), D), (L + "self_attn.q_proj.weight",)),
                TextTensor(b + "attn_kv_a_mqa.weight", (r + rope, D), (L + "self_attn.kv_a_proj_with_mqa.weight",)),
                TextTensor(b + "attn_kv_a_norm.weight", (r,), (L + "self_attn.kv_a_layernorm.weight",)),
                TextTensor(b + "attn_k_b.weight", (H, r, nope), kvb, "k_b"),
                TextTensor(b + "attn_v_b.weight", (H, vd, r), kvb, "v_b"),
                TextTensor(b + "attn_output.weight", (D, H * vd), (L + "self_attn.o_proj.weight",)),
                TextTensor(b + "ffn_norm.weight", (D,), (L + "post_attention_layernorm.weight",))]
        if not t.is_moe_layer(i):
            F = t.intermediate_size
            out += [TextTensor(b + f"ffn_{p}.weight", shp, (L + f"mlp.{p}_proj.weight",))
                    for p, shp in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F)))]
            continue
        out += [TextTensor(b + "ffn_gate_inp.weight", (E, D), (L + "mlp.gate.weight",)),
                TextTensor(b + "exp_probs_b.bias", (E,), (L + "mlp.gate.e_score_correction_bias",))]
        out += [TextTensor(b + f"ffn_{p}_exps.weight", (E, *shp),
                           tuple(L + f"mlp.experts.{e}.{p}_proj.weight" for e in range(E)), "stack")
                for p, shp in (("gate", (FE, D)), ("up", (FE, D)), ("down", (D, FE)))]
        out += [TextTensor(b + f"ffn_{p}_shexp.weight", shp, (L + f"mlp.shared_experts.{p}_proj.weight",))
                for p, shp in (("gate", (S, D)), ("up", (S, D)), ("down", (D, S)))]
    out += [TextTensor("output_norm.weight", (D,), (M + "norm.weight",)),
            TextTensor("output.weight", (t.vocab_size, D), ("language_model.lm_head.weight",))]
    return out


def text_shapes(t: TextConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(gguf name, numpy shape) of every text tensor, from the config alone."""
    return [(x.name, x.shape) for x in text_tensors(t)]


def _blocks(ck: Checkpoint, x: TextTensor, weights: np.ndarray | None) -> Callable[[], Iterable[Block]]:
    """``PlannedTensor.blocks`` of one tensor: the copied and stacked tensors stream in deferred row blocks, never
    widened whole; the kv_b_proj split is small and made whole. With importance ``weights`` ([n_mat, ne0]: one
    row per expert of a stacked tensor, per head of a split one, else one), every block carries its matrix's."""
    t = ck.config.text
    if x.how in ("k_b", "v_b"):
        nope, vd, r = t.qk_nope_head_dim, t.v_head_dim, t.kv_lora_rank

        def split() -> np.ndarray:
            w = ck.float32(x.sources[0]).reshape(t.num_attention_heads, nope + vd, r)
            if x.how == "k_b":
                return np.ascontiguousarray(w[:, :nope, :].transpose(0, 2, 1))  # [H, r, nope] (W_UK, transposed)
            return np.ascontiguousarray(w[:, nope:, :])  # [H, v, r]
        if weights is None:
            return whole(split, x.shape)
        return lambda: (Weighted(blk, weights[h]) for h, head in enumerate(split())
                        for blk in whole(partial(np.asarray, head), head.shape)())
    if weights is None:
        return lambda: (blk for n in x.sources for blk in ck.row_blocks(n, SLICE_BYTES))
    per_source = weights if x.how == "stack" else np.repeat(weights, len(x.sources), axis=0)
    return lambda: (Weighted(blk, w) for n, w in zip(x.sources, per_source) for blk in ck.row_blocks(n, SLICE_BYTES))


def text_types(t: TextConfig, shapes: list[tuple[str, tuple[int, ...]]],
               outtype: str, has_imatrix: bool = False) -> dict[str, tuple[QType, str]]:
    """{gguf name: (type, reason)} for (gguf name, numpy shape) pairs: ``quant.policy`` on a bf16 source (K-quant
    and IQ mixes get llama.cpp's ``llama_model_quantize`` types, quantized directly)."""
    return policy.text_plan([(n, tuple(reversed(s))) for n, s in shapes], as_ftype(outtype), t.num_hidden_layers,
                            n_expert=t.n_routed_experts, src_ftype=FType.BF16, has_imatrix=has_imatrix,
                            n_gqa=t.num_attention_heads)  # MLA: head_count_kv 1 in the file


def text_bytes(t: TextConfig, outtype: str) -> int:
    """Tensor bytes of the text GGUF for ``outtype`` (no range fallbacks), from the config alone."""
    shapes = text_shapes(t)
    types = text_types(t, shapes, outtype)
    return sum(nbytes(types[n][0], s) for n, s in shapes)


def text_metadata(ck: Checkpoint) -> dict[str, tuple[object, object]]:
    """The ``deepseek2.*`` hyper-parameters, as llama.cpp's converter writes them for Kimi-VL (§11), then ours."""
    t = ck.config.text
    LLM, Att, Rope = Keys.LLM, Keys.Attention, Keys.Rope

    def k(key: str) -> str:
        return key.format(arch=ARCH)
    return {
        k(LLM.BLOCK_COUNT): (t.num_hidden_layers, None),
        k(LLM.CONTEXT_LENGTH): (t.max_position_embeddings, None),
        k(LLM.EMBEDDING_LENGTH): (t.hidden_size, None),
        k(LLM.FEED_FORWARD_LENGTH): (t.intermediate_size, None),
        k(Att.HEAD_COUNT): (t.num_attention_heads, None),
        k(Att.HEAD_COUNT_KV): (1, None),  # MLA is stored as MQA over the latent
        k(Rope.FREQ_BASE): (float(t.rope_theta), None),
        k(Att.LAYERNORM_RMS_EPS): (float(t.rms_norm_eps), None),
        k(LLM.EXPERT_COUNT): (t.n_routed_experts, None),
        k(LLM.EXPERT_USED_COUNT): (t.num_experts_per_tok, None),
        k(LLM.EXPERT_GROUP_COUNT): (t.n_group, None),
        k(LLM.EXPERT_GROUP_USED_COUNT): (t.topk_group, None),
        k(LLM.EXPERT_GATING_FUNC): (int(gguf.ExpertGatingFuncType.SIGMOID), None),  # never leave it to the default
        k(LLM.LEADING_DENSE_BLOCK_COUNT): (t.first_k_dense_replace, None),
        k(LLM.VOCAB_SIZE): (t.vocab_size, None),
        k(Att.KV_LORA_RANK): (t.kv_lora_rank, None),
        # 0 = no q LoRA. llama.cpp only reads this key when the layer count is not 26/27 ("lite" models), and then
        # requires it: without it a reduced-depth Kimi-VL GGUF would not load.
        k(Att.Q_LORA_RANK): (0, None),
        k(Att.KEY_LENGTH): (t.kv_lora_rank + t.qk_rope_head_dim, None),
        k(Att.VALUE_LENGTH): (t.kv_lora_rank, None),
        k(Att.KEY_LENGTH_MLA): (t.qk_nope_head_dim + t.qk_rope_head_dim, None),
        k(Att.VALUE_LENGTH_MLA): (t.v_head_dim, None),
        k(LLM.EXPERT_FEED_FORWARD_LENGTH): (t.moe_intermediate_size, None),
        k(LLM.EXPERT_SHARED_COUNT): (t.n_shared_experts, None),
        k(LLM.EXPERT_WEIGHTS_SCALE): (float(t.routed_scaling_factor), None),
        k(LLM.EXPERT_WEIGHTS_NORM): (bool(t.norm_topk_prob), gguf.GGUFValueType.BOOL),
        k(Rope.DIMENSION_COUNT): (t.qk_rope_head_dim, None),
        # What llama.cpp's keys cannot say: HF normalises the MLA latent with 1e-6, llama.cpp with rms_norm_eps.
        EdgeKeys.Text.KV_A_LAYERNORM_EPS: (float(t.kv_a_layernorm_eps), None),
        EdgeKeys.MEDIA_PLACEHOLDER_TOKEN_ID: (ck.config.media_placeholder_token_id, None),
    }


def text_plan(ck: Checkpoint, outtype: str, kv: dict[str, tuple[object, object]],
              imatrix: Imatrix | None = None) -> GGUFPlan:
    """The per-tensor plan of the text GGUF for ``outtype``. K-quant and IQ mixes get the types llama.cpp's
    ``llama_model_quantize`` would choose from a BF16 file (``quant.policy``) and are quantized directly by ggml's
    own C quantizer, no intermediate file; with an ``imatrix`` (checked against the model by the caller), every
    quantized tensor it has an entry for gets its importance weights, per expert / head slice, as
    llama_model_quantize passes them. A value past a type's range is found while writing
    (``gguf_out.write_gguf`` writes that tensor BF16, or F32, and reports why)."""
    t = ck.config.text
    tensors = text_tensors(t)  # shapes from the config: the checkpoint's loader checked its tensors against it
    types = text_types(t, [(x.name, x.shape) for x in tensors], outtype, imatrix is not None)
    planned = []
    for x in tensors:
        q, why = types[x.name]
        w = None if q.is_float else weights_for(imatrix, x.name, x.shape)
        planned.append(PlannedTensor(x.name, x.shape, q, why + ("; imatrix" if w is not None else ""),
                                     blocks=_blocks(ck, x, w), sources=x.sources, weighted=w is not None))
    return GGUFPlan(ARCH, dict(kv), tuple(planned), bf16_fallback=True)
