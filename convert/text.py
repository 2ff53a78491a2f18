"""The text GGUF: the MoE decoder in llama.cpp's ``deepseek2`` layout (reference doc §3.3, §3.4, §9.4, §11).

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

from collections.abc import Callable

import gguf
import numpy as np

from kimivl_edge.checkpoint import Checkpoint
from kimivl_edge.config import TextConfig

from ..quant import policy
from ..quant.types import FType, as_ftype, nbytes
from .gguf_out import SLICE_BYTES, GGUFPlan, PlannedTensor

ARCH = "deepseek2"
# Our own metadata keys (llama.cpp ignores unknown keys).
KEY_PREFIX = "kimivl_edge"


def _src(ck: Checkpoint, name: str) -> Callable[[], np.ndarray]:
    return lambda: ck.float32(name)


def _hf_tensors(ck: Checkpoint) -> list[tuple]:
    """(gguf name, numpy shape, HF sources, make, blocks) for every text tensor, in llama.cpp's converter order;
    ``blocks`` (or None) gives deferred float32 row blocks so large tensors are never widened whole."""
    t: TextConfig = ck.config.text
    nh, r = t.num_attention_heads, t.kv_lora_rank
    nope, vd = t.qk_nope_head_dim, t.v_head_dim
    out = []

    def direct(gname: str, hf: str) -> None:
        shape = ck.shard(ck.weight_map[hf]).shape(hf)
        out.append((gname, shape, (hf,), _src(ck, hf), lambda hf=hf: ck.row_blocks(hf, SLICE_BYTES)))

    direct("token_embd.weight", "language_model.model.embed_tokens.weight")
    for i in range(t.num_hidden_layers):
        L = f"language_model.model.layers.{i}."
        b = f"blk.{i}."
        direct(b + "attn_norm.weight", L + "input_layernorm.weight")
        direct(b + "attn_q.weight", L + "self_attn.q_proj.weight")
        direct(b + "attn_kv_a_mqa.weight", L + "self_attn.kv_a_proj_with_mqa.weight")
        direct(b + "attn_kv_a_norm.weight", L + "self_attn.kv_a_layernorm.weight")
        kvb = L + "self_attn.kv_b_proj.weight"

        def k_b(kvb=kvb):
            w = ck.float32(kvb).reshape(nh, nope + vd, r)
            return np.ascontiguousarray(w[:, :nope, :].transpose(0, 2, 1))  # [H, r, nope]

        def v_b(kvb=kvb):
            w = ck.float32(kvb).reshape(nh, nope + vd, r)
            return np.ascontiguousarray(w[:, nope:, :])  # [H, v, r]

        out.append((b + "attn_k_b.weight", (nh, r, nope), (kvb,), k_b, None))
        out.append((b + "attn_v_b.weight", (nh, vd, r), (kvb,), v_b, None))
        direct(b + "attn_output.weight", L + "self_attn.o_proj.weight")
        direct(b + "ffn_norm.weight", L + "post_attention_layernorm.weight")
        if not t.is_moe_layer(i):
            for p in ("gate", "up", "down"):
                direct(b + f"ffn_{p}.weight", L + f"mlp.{p}_proj.weight")
            continue
        direct(b + "ffn_gate_inp.weight", L + "mlp.gate.weight")
        direct(b + "exp_probs_b.bias", L + "mlp.gate.e_score_correction_bias")
        for p in ("gate", "up", "down"):
            names = tuple(L + f"mlp.experts.{e}.{p}_proj.weight" for e in range(t.n_routed_experts))
            shape = (t.n_routed_experts, *ck.shard(ck.weight_map[names[0]]).shape(names[0]))
            out.append((b + f"ffn_{p}_exps.weight", shape, names,
                        lambda names=names: np.stack([ck.float32(n) for n in names]),
                        lambda names=names: (blk for n in names for blk in ck.row_blocks(n, SLICE_BYTES))))
        for p in ("gate", "up", "down"):
            direct(b + f"ffn_{p}_shexp.weight", L + f"mlp.shared_experts.{p}_proj.weight")
    direct("output_norm.weight", "language_model.model.norm.weight")
    direct("output.weight", "language_model.lm_head.weight")
    return out


def text_shapes(t: TextConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(gguf name, numpy shape) of every text tensor, from the config alone (the same list ``_hf_tensors`` builds
    from a checkpoint): sizes and type plans of the full model without its 32 GB of weights."""
    H, r, E = t.num_attention_heads, t.kv_lora_rank, t.n_routed_experts
    D, I, S = t.hidden_size, t.moe_intermediate_size, t.moe_intermediate_size * t.n_shared_experts
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (t.vocab_size, D))]
    for i in range(t.num_hidden_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (D,)), (b + "attn_q.weight", (H * (t.qk_nope_head_dim + t.qk_rope_head_dim), D)),
                (b + "attn_kv_a_mqa.weight", (r + t.qk_rope_head_dim, D)), (b + "attn_kv_a_norm.weight", (r,)),
                (b + "attn_k_b.weight", (H, r, t.qk_nope_head_dim)), (b + "attn_v_b.weight", (H, t.v_head_dim, r)),
                (b + "attn_output.weight", (D, H * t.v_head_dim)), (b + "ffn_norm.weight", (D,))]
        if not t.is_moe_layer(i):
            F = t.intermediate_size
            out += [(b + "ffn_gate.weight", (F, D)), (b + "ffn_up.weight", (F, D)), (b + "ffn_down.weight", (D, F))]
            continue
        out += [(b + "ffn_gate_inp.weight", (E, D)), (b + "exp_probs_b.bias", (E,)),
                (b + "ffn_gate_exps.weight", (E, I, D)), (b + "ffn_up_exps.weight", (E, I, D)),
                (b + "ffn_down_exps.weight", (E, D, I)),
                (b + "ffn_gate_shexp.weight", (S, D)), (b + "ffn_up_shexp.weight", (S, D)),
                (b + "ffn_down_shexp.weight", (D, S))]
    out += [("output_norm.weight", (D,)), ("output.weight", (t.vocab_size, D))]
    return out


def text_types(t: TextConfig, shapes: list[tuple[str, tuple[int, ...]]], outtype: str) -> dict[str, tuple]:
    """{gguf name: (type, reason)} for (gguf name, numpy shape) pairs: ``quant.policy`` on a bf16 source (K-quant
    mixes get llama.cpp's ``llama_model_quantize`` types, quantized directly)."""
    return policy.text_plan([(n, tuple(reversed(s))) for n, s in shapes], as_ftype(outtype), t.num_hidden_layers,
                            n_expert=t.n_routed_experts, src_ftype=FType.BF16)


def text_bytes(t: TextConfig, outtype: str) -> int:
    """Tensor bytes of the text GGUF for ``outtype`` (no range fallbacks), from the config alone."""
    shapes = text_shapes(t)
    types = text_types(t, shapes, outtype)
    return sum(nbytes(types[n][0], s) for n, s in shapes)


def text_metadata(ck: Checkpoint) -> dict[str, tuple[object, object]]:
    """The ``deepseek2.*`` hyper-parameters, as llama.cpp's converter writes them for Kimi-VL (§11)."""
    t = ck.config.text
    A = ARCH
    K = gguf.GGUFValueType
    return {
        f"{A}.block_count": (t.num_hidden_layers, None),
        f"{A}.context_length": (t.max_position_embeddings, None),
        f"{A}.embedding_length": (t.hidden_size, None),
        f"{A}.feed_forward_length": (t.intermediate_size, None),
        f"{A}.attention.head_count": (t.num_attention_heads, None),
        f"{A}.attention.head_count_kv": (1, None),  # MLA is stored as MQA over the latent
        f"{A}.rope.freq_base": (float(t.rope_theta), None),
        f"{A}.attention.layer_norm_rms_epsilon": (float(t.rms_norm_eps), None),
        f"{A}.expert_count": (t.n_routed_experts, None),
        f"{A}.expert_used_count": (t.num_experts_per_tok, None),
        f"{A}.expert_group_count": (t.n_group, None),
        f"{A}.expert_group_used_count": (t.topk_group, None),
        f"{A}.expert_gating_func": (int(gguf.ExpertGatingFuncType.SIGMOID), None),  # never leave it to the default
        f"{A}.leading_dense_block_count": (t.first_k_dense_replace, None),
        f"{A}.vocab_size": (t.vocab_size, None),
        f"{A}.attention.kv_lora_rank": (t.kv_lora_rank, None),
        # 0 = no q LoRA. llama.cpp only reads this key when the layer count is not 26/27 ("lite" models), and then
        # requires it: without it a reduced-depth Kimi-VL GGUF would not load.
        f"{A}.attention.q_lora_rank": (0, None),
        f"{A}.attention.key_length": (t.kv_lora_rank + t.qk_rope_head_dim, None),
        f"{A}.attention.value_length": (t.kv_lora_rank, None),
        f"{A}.attention.key_length_mla": (t.qk_nope_head_dim + t.qk_rope_head_dim, None),
        f"{A}.attention.value_length_mla": (t.v_head_dim, None),
        f"{A}.expert_feed_forward_length": (t.moe_intermediate_size, None),
        f"{A}.expert_shared_count": (t.n_shared_experts, None),
        f"{A}.expert_weights_scale": (float(t.routed_scaling_factor), None),
        f"{A}.expert_weights_norm": (bool(t.norm_topk_prob), K.BOOL),
        f"{A}.rope.dimension_count": (t.qk_rope_head_dim, None),
        # What llama.cpp's keys cannot say: HF normalises the MLA latent with 1e-6, llama.cpp with rms_norm_eps.
        f"{KEY_PREFIX}.text.kv_a_layernorm_epsilon": (float(t.kv_a_layernorm_eps), None),
        f"{KEY_PREFIX}.media_placeholder_token_id": (ck.config.media_placeholder_token_id, None),
    }


def text_plan(ck: Checkpoint, outtype: str, kv: dict[str, tuple[object, object]]) -> GGUFPlan:
    """The per-tensor plan of the text GGUF for ``outtype``. K-quant mixes get the types llama.cpp's
    ``llama_model_quantize`` would choose from a BF16 file (``quant.policy``) and are quantized directly by ggml's
    own C quantizer, no intermediate file. A value past a type's range is found while writing
    (``gguf_out.write_gguf`` switches that tensor to BF16/F32 and says why)."""
    t = ck.config.text
    tensors = _hf_tensors(ck)
    types = text_types(t, [(n, s) for n, s, *_ in tensors], outtype)
    planned = [PlannedTensor(name, shape, *types[name], make, sources, blocks)
               for name, shape, sources, make, blocks in tensors]
    return GGUFPlan(ARCH, dict(kv), planned)
