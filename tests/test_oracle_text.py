"""The fp32 text-decoder reference (kimivl_edge/reference/text.py) against transformers' DeepseekV3ForCausalLM.

The oracle is built as in docs/model.md §12.1 and loaded by hand from the same random weights (experts fused as the
installed class expects, §3.4). Mutation tests replace one reference formula by a plausible wrong one (§9.5, §9.3)
and check that the comparison then fails, so the tolerance is known to be able to catch those mistakes.
"""
from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kimivl_edge.config import TextConfig  # noqa: E402
from kimivl_edge.reference import text as ref  # noqa: E402
from kimivl_edge.synth import preset_config  # noqa: E402

torch.set_num_threads(1)

TOL = 1e-5
KIMI = preset_config("tiny")
MEDIA = KIMI.media_placeholder_token_id
TINY: TextConfig = KIMI.text
# Second shape: top-3 of 8, two shared experts (one fused 2x-wide MLP), two dense layers, no renormalisation,
# fewer heads and a smaller rope dim / theta.
WIDE: TextConfig = dataclasses.replace(
    TINY, hidden_size=128, intermediate_size=320, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=3, n_shared_experts=2, kv_lora_rank=64,
    qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=2, norm_topk_prob=False,
    rope_theta=10000.0, routed_scaling_factor=1.5)


# ---------------------------------------------------------------------------------------------------------------
# Random checkpoint in HF names (§3.3)


def make_weights(cfg: TextConfig, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights: linears std 0.02 (attention projections 0.08 so attention is not uniform; embeddings 0.5),
    norms 1 +- 0.1,
    correction bias of the size of the sigmoid-score spread (so it changes the top-k), garbage ``inv_freq``."""
    g = torch.Generator().manual_seed(seed)

    def lin(out: int, inp: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    H, D = cfg.num_attention_heads, cfg.hidden_size
    m, L = "language_model.model.", "language_model.model.layers."
    w = {m + "embed_tokens.weight": lin(cfg.vocab_size, D, 0.5), m + "norm.weight": norm(D),
         "language_model.lm_head.weight": lin(cfg.vocab_size, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"{L}{i}."
        w[p + "input_layernorm.weight"] = norm(D)
        w[p + "post_attention_layernorm.weight"] = norm(D)
        a = p + "self_attn."
        w[a + "q_proj.weight"] = lin(H * cfg.qk_head_dim, D, 0.08)
        w[a + "kv_a_proj_with_mqa.weight"] = lin(cfg.kv_lora_rank + cfg.qk_rope_head_dim, D, 0.08)
        w[a + "kv_a_layernorm.weight"] = norm(cfg.kv_lora_rank)
        w[a + "kv_b_proj.weight"] = lin(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank, 0.08)
        w[a + "o_proj.weight"] = lin(D, H * cfg.v_head_dim)
        w[a + "rotary_emb.inv_freq"] = torch.full((cfg.qk_rope_head_dim // 2,), 123.0)  # must be ignored
        f = p + "mlp."
        if not cfg.is_moe_layer(i):
            w[f + "gate_proj.weight"] = lin(cfg.intermediate_size, D)
            w[f + "up_proj.weight"] = lin(cfg.intermediate_size, D)
            w[f + "down_proj.weight"] = lin(D, cfg.intermediate_size)
            continue
        Im, S = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        w[f + "gate.weight"] = lin(cfg.n_routed_experts, D)
        w[f + "gate.e_score_correction_bias"] = 0.1 * torch.randn(cfg.n_routed_experts, generator=g)
        for e in range(cfg.n_routed_experts):
            w[f"{f}experts.{e}.gate_proj.weight"] = lin(Im, D)
            w[f"{f}experts.{e}.up_proj.weight"] = lin(Im, D)
            w[f"{f}experts.{e}.down_proj.weight"] = lin(D, Im)
        w[f + "shared_experts.gate_proj.weight"] = lin(S, D)
        w[f + "shared_experts.up_proj.weight"] = lin(S, D)
        w[f + "shared_experts.down_proj.weight"] = lin(D, S)
    return w


# ---------------------------------------------------------------------------------------------------------------
# Oracle (§12.1)

# Kimi-VL text_config keys DeepseekV3Config does not have; the behaviour they name is hard-coded in the class.
HARD_CODED = {"moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"}


def oracle_config(cfg: TextConfig) -> "transformers.DeepseekV3Config":
    fields = set(transformers.DeepseekV3Config.__dataclass_fields__)
    d = dataclasses.asdict(cfg)
    for k, v in HARD_CODED.items():
        assert d[k] == v, f"{k}={d[k]!r}: DeepseekV3ForCausalLM cannot express it"
    assert d["rope_scaling"] is None
    kw = {k: v for k, v in d.items() if k in fields and k not in ("rope_theta", "rope_scaling")}
    kw.update(q_lora_rank=None, rope_interleave=True, attention_bias=False,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if "num_mtp_layers" in fields:
        kw["num_mtp_layers"] = 0
    oc = transformers.DeepseekV3Config(**kw)
    oc._attn_implementation = "eager"
    oc._experts_implementation = "eager"
    return oc


def oracle_state_dict(cfg: TextConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``language_model.``, drop ``inv_freq``, fuse experts: gate_up_proj [E, 2I, D] (gate rows first),
    down_proj [E, D, I] (§3.4, read in DeepseekV3Experts)."""
    sd = {k[len("language_model."):]: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}
    for i in range(cfg.num_hidden_layers):
        f = f"model.layers.{i}.mlp."
        if not cfg.is_moe_layer(i):
            continue
        es = range(cfg.n_routed_experts)
        gate = [sd.pop(f"{f}experts.{e}.gate_proj.weight") for e in es]
        up = [sd.pop(f"{f}experts.{e}.up_proj.weight") for e in es]
        down = [sd.pop(f"{f}experts.{e}.down_proj.weight") for e in es]
        sd[f + "experts.gate_up_proj"] = torch.stack([torch.cat([a, b], 0) for a, b in zip(gate, up)])
        sd[f + "experts.down_proj"] = torch.stack(down)
    return sd


def build_oracle(cfg: TextConfig, w: dict[str, torch.Tensor]):
    model = transformers.DeepseekV3ForCausalLM(oracle_config(cfg)).float().eval()
    model.load_state_dict(oracle_state_dict(cfg, w), strict=True)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        assert model.model.layers[i].mlp.gate.e_score_correction_bias.dtype == torch.float32
    return model


@torch.no_grad()
def oracle_logits(model, inputs_embeds: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=inputs_embeds[None], use_cache=False).logits[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------------------------
# Prompts: text-only and with image rows spliced in (§9.1)


def make_prompts(cfg: TextConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    base = cfg.vocab_size - 256  # regular tokens; no media placeholder among them

    def toks(n: int) -> torch.Tensor:
        return torch.randint(0, base, (n,), generator=g)

    def img(n: int) -> torch.Tensor:
        return torch.randn(n, cfg.hidden_size, generator=g)

    media = lambda n: torch.full((n,), MEDIA)  # noqa: E731
    return [
        (toks(1), None),
        (toks(7), None),
        (toks(40), None),
        (torch.cat([toks(3), media(4), toks(5)]), img(4)),
        (torch.cat([media(6), toks(2), media(3), toks(20)]), img(9)),
    ]


CASES = {"tiny": (TINY, 0), "wide": (WIDE, 1)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    cfg, seed = CASES[request.param]
    w = make_weights(cfg, seed)
    model = build_oracle(cfg, w)
    prompts = make_prompts(cfg, seed + 100)
    embeds = [ref.embed(w, cfg, ids, img, MEDIA) for ids, img in prompts]
    expected = [oracle_logits(model, e) for e in embeds]
    return dict(name=request.param, cfg=cfg, w=w, model=model, prompts=prompts, embeds=embeds, expected=expected)


def max_rel_err(case) -> float:
    with torch.no_grad():
        return max(rel_err(ref.decoder_forward(case["w"], case["cfg"], e), x)
                   for e, x in zip(case["embeds"], case["expected"]))


# ---------------------------------------------------------------------------------------------------------------
# Tests


def test_logits_match_oracle(case):
    with torch.no_grad():
        for (ids, img), e, expected in zip(case["prompts"], case["embeds"], case["expected"]):
            got = ref.decoder_forward(case["w"], case["cfg"], e)
            assert got.shape == (len(ids), case["cfg"].vocab_size) and got.dtype == torch.float32
            assert rel_err(got, expected) <= TOL, (case["name"], len(ids), img is not None)


def test_text_only_embeddings_match_oracle_table(case):
    """Without images embed() is a plain lookup: the oracle's own embedding layer gives the same rows."""
    ids, img = case["prompts"][2]
    assert img is None
    with torch.no_grad():
        table = case["model"].model.embed_tokens(ids[None])[0]
    assert torch.equal(ref.embed(case["w"], case["cfg"], ids, None, MEDIA), table)


def test_image_rows_spliced_in_order():
    cfg, w = TINY, make_weights(TINY, 0)
    ids = torch.tensor([5, MEDIA, 6, MEDIA, MEDIA, 7])
    img = torch.arange(3 * cfg.hidden_size, dtype=torch.float32).view(3, cfg.hidden_size)
    e = ref.embed(w, cfg, ids, img, MEDIA)
    table = w["language_model.model.embed_tokens.weight"]
    assert torch.equal(e[[1, 3, 4]], img)
    assert torch.equal(e[[0, 2, 5]], table[[5, 6, 7]])


@pytest.mark.parametrize("n_slots,n_rows", [(2, 3), (3, 2), (2, 0), (0, 1)])
def test_embed_count_mismatch(n_slots, n_rows):
    cfg, w = TINY, make_weights(TINY, 0)
    ids = torch.tensor([1] + [MEDIA] * n_slots + [2])
    img = torch.zeros(n_rows, cfg.hidden_size) if n_rows else None
    with pytest.raises(ValueError, match="media placeholder"):
        ref.embed(w, cfg, ids, img, MEDIA)


def test_rope_interleaved_is_complex_rotation():
    """Pair (2j, 2j+1) as a complex number times exp(i p theta^(-2j/d)) (§9.3)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 16, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 17, 40])
    w = 800000.0 ** (-torch.arange(8, dtype=torch.float64) * 2 / 16)
    rot = torch.polar(torch.ones(5, 1, 8, dtype=torch.float64), pos[:, None, None] * w)
    expected = torch.view_as_real(torch.view_as_complex(x.view(5, 3, 8, 2)) * rot).flatten(-2)
    assert torch.allclose(ref.rope_interleaved(x, pos, 800000.0), expected, atol=1e-12)


def test_correction_bias_changes_selection(case):
    """The random bias is large enough to matter: top-k of s + b differs from top-k of s for many inputs."""
    cfg, w = case["cfg"], case["w"]
    p = f"language_model.model.layers.{cfg.first_k_dense_replace}.mlp.gate."
    x = torch.randn(200, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    s = torch.sigmoid(x @ w[p + "weight"].T)
    k = cfg.num_experts_per_tok
    plain = torch.topk(s, k).indices.sort(-1).values
    biased = torch.topk(s + w[p + "e_score_correction_bias"], k).indices.sort(-1).values
    assert (plain != biased).any(-1).float().mean() > 0.2


# Mutations: each is a mistake a port could make; the oracle comparison must catch it.


def _no_bias_route(orig):
    return lambda x, gate_w, bias, cfg: orig(x, gate_w, torch.zeros_like(bias), cfg)


def _neox_rope(x, positions, theta):
    d = x.shape[-1]
    ang = positions.double()[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = ang.reshape(ang.shape[0], *([1] * (x.dim() - 2)), d // 2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _scaled_shared_moe(orig):
    def moe(x, weights, prefix, cfg):
        sp = prefix + "shared_experts."
        shared = ref.swiglu(x, weights[sp + "gate_proj.weight"], weights[sp + "up_proj.weight"],
                            weights[sp + "down_proj.weight"])
        return orig(x, weights, prefix, cfg) + (cfg.routed_scaling_factor - 1.0) * shared
    return moe


MUTATIONS = {
    "no_correction_bias": ("route", _no_bias_route),
    "softmax_router": ("router_scores", lambda orig: lambda z: torch.softmax(z, dim=-1)),
    "neox_rope": ("rope_interleaved", lambda orig: _neox_rope),
    "shared_experts_scaled": ("moe", _scaled_shared_moe),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_mutation_is_detected(case, mutation, monkeypatch):
    assert max_rel_err(case) <= TOL
    name, make = MUTATIONS[mutation]
    monkeypatch.setattr(ref, name, make(getattr(ref, name)))
    assert max_rel_err(case) > TOL, mutation


@torch.no_grad()
def oracle_greedy(model, cfg: TextConfig, w, ids, img, n: int) -> list[int]:
    emb = ref.embed(w, cfg, ids, img, MEDIA)
    out = []
    for _ in range(n):
        logits = oracle_logits(model, emb)[-1]
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) > 1e-4 * float(logits.abs().max())  # no near-tie
        nxt = int(logits.argmax())
        out.append(nxt)
        emb = torch.cat([emb, model.model.embed_tokens(torch.tensor([[nxt]]))[0]], dim=0)
    return out


def test_greedy_generate_matches_oracle(case):
    cfg, w, model = case["cfg"], case["w"], case["model"]
    ids, img = case["prompts"][3]
    expected = oracle_greedy(model, cfg, w, ids, img, 6)
    with torch.no_grad():
        got = ref.greedy_generate(w, cfg, ids, img, MEDIA, max_new_tokens=6, stop_ids=[])
        assert got == expected
        stop = expected[2]
        first = expected.index(stop)
        got = ref.greedy_generate(w, cfg, ids, img, MEDIA, max_new_tokens=6, stop_ids=[stop, cfg.eos_token_id])
        assert got == expected[: first + 1]
