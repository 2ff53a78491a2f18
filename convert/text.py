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
from ..quant.types import FType, QType, as_ftype
from .gguf_out import GGUFPlan, PlannedTensor

ARCH = "deepseek2"
# Our own metadata keys (llama.cpp ignores unknown keys).
KEY_PREFIX = "kimivl_edge"
# Largest |x| a bf16 value may have and still be finite in F16: bf16 0x477F = 65280 <= 65504 < 0x4780 = 65536.
_BF16_F16_MAX_BITS = 0x477F


def _src(ck: Checkpoint, name: str) -> Callable[[], np.ndarray]:
    return lambda: ck.float32(name)


def _hf_tensors(ck: Checkpoint) -> list[tuple]:
    """(gguf name, numpy shape, HF sources, make, chunks) for every text tensor, in llama.cpp's converter order;
    ``chunks`` (or None) streams float32 row blocks so large tensors are never widened whole."""
    t: TextConfig = ck.config.text
    nh, r = t.num_attention_heads, t.kv_lora_rank
    nope, vd = t.qk_nope_head_dim, t.v_head_dim
    out = []

    def direct(gname: str, hf: str) -> None:
        shape = ck.shard(ck.weight_map[hf]).shape(hf)
        out.append((gname, shape, (hf,), _src(ck, hf), lambda hf=hf: ck.row_blocks(hf)))

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
                        lambda names=names: (blk for n in names for blk in ck.row_blocks(n))))
        for p in ("gate", "up", "down"):
            direct(b + f"ffn_{p}_shexp.weight", L + f"mlp.shared_experts.{p}_proj.weight")
    direct("output_norm.weight", "language_model.model.norm.weight")
    direct("output.weight", "language_model.lm_head.weight")
    return out


def bf16_fits_f16(ck: Checkpoint, names: tuple[str, ...]) -> tuple[bool, float]:
    """Whether every value of the (bf16 or wider) source tensors is finite in F16, and the largest |x|."""
    amax = 0.0
    ok = True
    for n in names:
        raw = ck.raw(n)
        if ck.dtype(n) == "BF16":
            flat = raw.reshape(-1)
            step = 1 << 24  # scan in pieces: no full-size temporary
            bits = max((int(np.max(flat[a: a + step] & np.uint16(0x7FFF))) for a in range(0, flat.size, step)),
                       default=0)
            finite = bits < 0x7F80
            ok &= (bits <= _BF16_F16_MAX_BITS) or not finite
            amax = max(amax, float(np.array([bits << 16], np.uint32).view(np.float32)[0]) if finite else amax)
        else:
            a = np.abs(raw[np.isfinite(raw)]).max(initial=0.0)
            ok &= bool(a <= 65504.0)
            amax = max(amax, float(a))
    return ok, amax


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
    """The per-tensor plan of the text GGUF for ``outtype``. For K-quant mixes this is the plan of the BF16
    intermediate file; the final types llama_model_quantize will choose are in ``final_types``."""
    t = ck.config.text
    ft = as_ftype(outtype)
    tensors = _hf_tensors(ck)
    src_ft = FType.BF16 if ft.is_kquant_mix else ft
    types = policy.text_plan([(n, tuple(reversed(s))) for n, s, *_ in tensors], src_ft, t.num_hidden_layers,
                             n_expert=t.n_routed_experts)
    planned = []
    for name, shape, sources, make, chunks in tensors:
        q, why = types[name]
        if q in (QType.F16, QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q5_1, QType.IQ4_NL):
            ok, amax = bf16_fits_f16(ck, sources)
            if not ok:
                q2, why2 = policy.range_safe(q, np.array([amax], np.float32))
                q, why = q2, f"range: {why2 or f'|x| up to {amax:g} overflows {q.value}'}"
        planned.append(PlannedTensor(name, shape, q, why, make, sources, chunks))
    return GGUFPlan(ARCH, dict(kv), planned)


def final_types(plan: GGUFPlan, outtype: str, n_layers: int, n_expert: int) -> dict[str, tuple[QType, str]]:
    """The types the final file will have: the plan's own for direct types, llama.cpp's recipe for K-quant mixes."""
    ft = as_ftype(outtype)
    if not ft.is_kquant_mix:
        return {p.name: (p.qtype, p.reason) for p in plan.tensors}
    src = {p.name: p.qtype for p in plan.tensors}
    rec = policy.text_plan([(p.name, p.ne) for p in plan.tensors], ft, n_layers, n_expert=n_expert,
                           src_ftype=FType.BF16)
    # tensors llama.cpp leaves alone keep the intermediate's type (F32 norms, BF16 or F32 range-kept tensors)
    return {n: ((src[n], r) if r.startswith("not quantized") else (q, r)) for n, (q, r) in rec.items()}
