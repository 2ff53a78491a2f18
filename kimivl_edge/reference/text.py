"""fp32 PyTorch reference of the Kimi-VL text decoder (DeepSeek-V3 style), docs/model.md §9.

Functional style over a weight dict keyed by the HF checkpoint names (§3.3), e.g.
``language_model.model.layers.{i}.self_attn.q_proj.weight``. Every formula is a small module-level function, looked
up at call time, so a test can replace one of them. One sequence at a time, positions 0..T-1, no KV cache.
``rotary_emb.inv_freq`` buffers in the dict are ignored: frequencies are computed from ``rope_theta`` (§3.3, §10.7).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..config import TextConfig

Weights = Mapping[str, torch.Tensor]

LM = "language_model."
MODEL = LM + "model."


def layer_prefix(i: int) -> str:
    """Name prefix of decoder layer ``i`` (§3.3)."""
    return f"{MODEL}layers.{i}."


# ---------------------------------------------------------------------------------------------------------------
# Elementary formulas


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis: g * x / sqrt(mean(x^2) + eps) (§9.2)."""
    return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """omega_j = theta^(-2j/dim), j = 0..dim/2-1, in float64 (§9.3)."""
    j = torch.arange(0, dim, 2, dtype=torch.float64)
    return 1.0 / (theta ** (j / dim))


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """GPT-J RoPE (§9.3): the adjacent pair (2j, 2j+1) of x[t] rotates by positions[t] * omega_j.

    ``x`` is [T, ..., d] (d even), ``positions`` [T]; the output keeps the interleaved layout of the input.
    """
    d = x.shape[-1]
    ang = positions.to(torch.float64)[:, None] * rope_inv_freq(d, theta)[None, :]  # [T, d/2]
    ang = ang.reshape(ang.shape[0], *([1] * (x.dim() - 2)), d // 2)
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    xr, xi = x[..., 0::2], x[..., 1::2]
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1)
    return out.flatten(-2)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) (``hidden_act`` = "silu")."""
    return x * torch.sigmoid(x)


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x) with [out, in] linear weights (§9.5, §9.6)."""
    return (silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


# ---------------------------------------------------------------------------------------------------------------
# Attention


def mla(x: torch.Tensor, weights: Weights, prefix: str, cfg: TextConfig, positions: torch.Tensor) -> torch.Tensor:
    """Multi-head latent attention without q-LoRA, decompressed form, causal (§9.3, layouts §3.4).

    ``x`` is the normed input [T, hidden]; ``prefix`` ends with ``self_attn.``; returns [T, hidden].
    """
    T = x.shape[0]
    H, dn, dr, dv, r = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    q = (x @ weights[prefix + "q_proj.weight"].T).view(T, H, dn + dr)
    q_nope, q_rope = q[..., :dn], q[..., dn:]
    a = x @ weights[prefix + "kv_a_proj_with_mqa.weight"].T  # [T, r + dr]
    c = rms_norm(a[:, :r], weights[prefix + "kv_a_layernorm.weight"], cfg.kv_a_layernorm_eps)
    k_rope = a[:, r:]  # [T, dr], shared by all heads
    kv = (c @ weights[prefix + "kv_b_proj.weight"].T).view(T, H, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    q_rope = rope_interleaved(q_rope, positions, cfg.rope_theta)
    k_rope = rope_interleaved(k_rope, positions, cfg.rope_theta)
    scores = torch.einsum("shd,thd->hst", q_nope, k_nope) + torch.einsum("shd,td->hst", q_rope, k_rope)
    scores = scores * cfg.qk_head_dim ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("hst,thd->shd", p, v).reshape(T, H * dv)
    return out @ weights[prefix + "o_proj.weight"].T


# ---------------------------------------------------------------------------------------------------------------
# Feed-forward


def dense_mlp(x: torch.Tensor, weights: Weights, prefix: str) -> torch.Tensor:
    """Dense SwiGLU of the first ``first_k_dense_replace`` layers (§9.6); ``prefix`` ends with ``mlp.``."""
    return swiglu(x, weights[prefix + "gate_proj.weight"], weights[prefix + "up_proj.weight"],
                  weights[prefix + "down_proj.weight"])


def router_scores(logits: torch.Tensor) -> torch.Tensor:
    """Expert affinities s = sigmoid(z) (§9.5, ``scoring_func`` = "sigmoid")."""
    return torch.sigmoid(logits)


def select_experts(scores: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] of the k largest s + e_score_correction_bias; the bias only selects (§9.5).

    n_group = topk_group = 1 in every Kimi-VL config, so there is no group limit.
    """
    return torch.topk(scores + bias, k, dim=-1).indices


def route(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor, cfg: TextConfig
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of a MoE layer (§9.5): (indices [T, k], weights [T, k]).

    Weights are the unbiased sigmoid scores of the selected experts, renormalised (+1e-20) if ``norm_topk_prob``,
    times ``routed_scaling_factor``.
    """
    s = router_scores(x.float() @ gate_w.float().T)
    idx = select_experts(s, bias.float(), cfg.num_experts_per_tok)
    w = s.gather(-1, idx)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def moe(x: torch.Tensor, weights: Weights, prefix: str, cfg: TextConfig) -> torch.Tensor:
    """Routed experts weighted by ``route`` plus the unscaled shared experts (§9.5); ``prefix`` ends with ``mlp.``."""
    idx, w = route(x, weights[prefix + "gate.weight"], weights[prefix + "gate.e_score_correction_bias"], cfg)
    y = torch.zeros_like(x)
    for e in torch.unique(idx).tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        ep = f"{prefix}experts.{e}."
        out = swiglu(x[tok], weights[ep + "gate_proj.weight"], weights[ep + "up_proj.weight"],
                     weights[ep + "down_proj.weight"])
        y = y.index_add(0, tok, out * w[tok, slot, None].to(x.dtype))
    sp = prefix + "shared_experts."
    return y + swiglu(x, weights[sp + "gate_proj.weight"], weights[sp + "up_proj.weight"],
                      weights[sp + "down_proj.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Model


def embed(weights: Weights, cfg: TextConfig, input_ids: torch.Tensor | Sequence[int],
          image_embeds: torch.Tensor | None, media_token_id: int) -> torch.Tensor:
    """Token embeddings [T, hidden] with the media-placeholder rows replaced, in order, by ``image_embeds`` (§9.1)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    e = weights[MODEL + "embed_tokens.weight"][ids].clone()
    slots = ids == media_token_id
    n_slots = int(slots.sum())
    n_rows = 0 if image_embeds is None else int(image_embeds.shape[0])
    if n_slots != n_rows:
        raise ValueError(f"{n_slots} media placeholder tokens (id {media_token_id}) in the prompt but {n_rows} "
                         f"image embedding rows; they must match exactly")
    if image_embeds is not None and n_rows:
        if image_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"image embeddings have width {image_embeds.shape[-1]}, expected {cfg.hidden_size}")
        e[slots] = image_embeds.to(e.dtype)
    return e


def decoder_layer(h: torch.Tensor, weights: Weights, cfg: TextConfig, i: int, positions: torch.Tensor
                  ) -> torch.Tensor:
    """One pre-norm decoder layer (§9.2): attention residual, then dense (§9.6) or MoE (§9.5) residual."""
    p = layer_prefix(i)
    h = h + mla(rms_norm(h, weights[p + "input_layernorm.weight"], cfg.rms_norm_eps), weights, p + "self_attn.",
                cfg, positions)
    x = rms_norm(h, weights[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    ffn = moe(x, weights, p + "mlp.", cfg) if cfg.is_moe_layer(i) else dense_mlp(x, weights, p + "mlp.")
    return h + ffn


def decoder_forward(weights: Weights, cfg: TextConfig, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of one sequence [T, hidden] at positions 0..T-1 (§9.2): layers, final norm, untied head."""
    h = inputs_embeds.float()
    positions = torch.arange(h.shape[0])
    for i in range(cfg.num_hidden_layers):
        h = decoder_layer(h, weights, cfg, i, positions)
    h = rms_norm(h, weights[MODEL + "norm.weight"], cfg.rms_norm_eps)
    return h @ weights[LM + "lm_head.weight"].T


def greedy_generate(weights: Weights, cfg: TextConfig, input_ids: torch.Tensor | Sequence[int],
                    image_embeds: torch.Tensor | None, media_token_id: int, max_new_tokens: int,
                    stop_ids: Iterable[int]) -> list[int]:
    """Greedy decoding by full recomputation; returns the new tokens, including a stop token if one is produced."""
    stop = set(int(s) for s in stop_ids)
    emb = embed(weights, cfg, input_ids, image_embeds, media_token_id)
    table = weights[MODEL + "embed_tokens.weight"]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(torch.argmax(decoder_forward(weights, cfg, emb)[-1]))
        out.append(nxt)
        if nxt in stop:
            break
        emb = torch.cat([emb, table[nxt][None].to(emb.dtype)], dim=0)
    return out
