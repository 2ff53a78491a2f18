"""Oracle test of the fp32 MoonViT + merge + projector reference (kimivl_edge/reference/vision.py).

Oracle: transformers 5.23's own ``Kimi_K25VisionModel`` + ``Kimi_K25MultimodalProjection`` (docs/model.md §12.2),
built from a ``Kimi_K25Config`` and loaded with random weights remapped from the Kimi-VL checkpoint names, with the
Q/K rows of ``wqkv`` permuted into the rotate-half form (docs/model.md §5.4). The bicubic resampling matrices are
checked against ``torch.nn.functional.interpolate`` (docs/model.md §5.2).

Bounds. Both sides are fp32 implementations of the same formulas, so besides the per-token cosine >= 0.99999 the
comparison also bounds the per-token relative L2 error (||ref - oracle|| / ||oracle||) by REL_TOL. This second bound
is needed: swapping GELU-tanh and GELU-erf changes an activation by at most 4.7e-4 (about 2e-4 relative), which moves
the cosine by only ~1e-8 and is invisible to a 0.99999 cosine bound, but it is ~10x over REL_TOL.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kimivl_edge.config import VisionConfig
from kimivl_edge.reference import vision as V
from kimivl_edge.synth import preset_config

transformers = pytest.importorskip("transformers")
from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig  # noqa: E402
from transformers.models.kimi_k25.modeling_kimi_k25 import (  # noqa: E402
    Kimi_K25MultimodalProjection,
    Kimi_K25VisionModel,
)

torch.set_num_threads(1)

COS_TOL = 0.99999
REL_TOL = 2e-5

TINY = preset_config("tiny")
TEXT_HIDDEN = TINY.text.hidden_size
# tiny preset: hidden 128, 2 heads (head dim 64), 3 layers, pos-emb 16x16.
CFG_TINY = TINY.vision
# the real head dim 72 (2 heads of 72), 2 layers, 16x16 pos-emb.
CFG_72 = dataclasses.replace(TINY.vision, hidden_size=144, num_attention_heads=2, num_hidden_layers=2,
                             intermediate_size=288)
CONFIGS = {"tiny": CFG_TINY, "hd72": CFG_72}
GRIDS = [(16, 16), (6, 10), (20, 12), (2, 2)]
MUTATION_GRID = (6, 10)


# ---------------------------------------------------------------------------------------------------------------
# random weights under the Kimi-VL checkpoint names (docs/model.md §3.1, §3.2)

def random_weights(cfg: VisionConfig, text_hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights at realistic scales.

    Q/K rows of wqkv and fc0 / linear_1 get larger stds than 0.02 so that attention is far from uniform (else RoPE
    would hardly matter) and GELU inputs reach |x| ~ 1-3 (where tanh and erf GELU differ most), as in trained nets.
    """
    g = torch.Generator().manual_seed(seed)
    hid, inter, ps = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    merged = hid * cfg.merge_area

    def rn(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    t, b = V.TOWER, V.BLOCK
    w = {
        t + "patch_embed.proj.weight": rn(hid, 3, ps, ps),
        t + "patch_embed.proj.bias": rn(hid),
        t + "patch_embed.pos_emb.weight": rn(cfg.init_pos_emb_height, cfg.init_pos_emb_width, hid),
        t + "encoder.final_layernorm.weight": rn(hid, std=0.1, mean=1.0),
        t + "encoder.final_layernorm.bias": rn(hid),
    }
    for i in range(cfg.num_hidden_layers):
        p = b.format(i)
        w |= {
            p + "norm0.weight": rn(hid, std=0.1, mean=1.0), p + "norm0.bias": rn(hid),
            p + "wqkv.weight": torch.cat([rn(hid, hid, std=0.1), rn(hid, hid, std=0.1), rn(hid, hid, std=0.05)]),
            p + "wqkv.bias": rn(3 * hid),
            p + "wo.weight": rn(hid, hid, std=0.05), p + "wo.bias": rn(hid),
            p + "norm1.weight": rn(hid, std=0.1, mean=1.0), p + "norm1.bias": rn(hid),
            p + "mlp.fc0.weight": rn(inter, hid, std=0.15), p + "mlp.fc0.bias": rn(inter),
            p + "mlp.fc1.weight": rn(hid, inter, std=0.05), p + "mlp.fc1.bias": rn(hid),
        }
    m = V.PROJ
    w |= {
        m + "pre_norm.weight": rn(hid, std=0.1, mean=1.0), m + "pre_norm.bias": rn(hid),
        m + "linear_1.weight": rn(merged, merged, std=0.07), m + "linear_1.bias": rn(merged),
        m + "linear_2.weight": rn(text_hidden, merged), m + "linear_2.bias": rn(text_hidden),
    }
    return w


# ---------------------------------------------------------------------------------------------------------------
# the oracle (docs/model.md §12.2)

def rotate_half_rows(t: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Per head: new row j <- old 2j, new row d/2 + j <- old 2j + 1 (docs/model.md §5.4), for Q or K rows."""
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    idx = (torch.arange(heads)[:, None] * head_dim + perm).reshape(-1)
    return t[idx]


def to_k25(w: dict[str, torch.Tensor], cfg: VisionConfig) -> tuple[dict, dict]:
    """Kimi-VL names -> (Kimi_K25VisionModel state dict, Kimi_K25MultimodalProjection state dict), §12.2 table."""
    t, hid = V.TOWER, cfg.hidden_size
    tower = {
        "patch_embed.proj.weight": w[t + "patch_embed.proj.weight"],
        "patch_embed.proj.bias": w[t + "patch_embed.proj.bias"],
        "patch_embed.pos_emb.position_embeddings": w[t + "patch_embed.pos_emb.weight"],
        "final_layernorm.weight": w[t + "encoder.final_layernorm.weight"],
        "final_layernorm.bias": w[t + "encoder.final_layernorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        p, o = V.BLOCK.format(i), f"layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = w[p + "wqkv." + kind].split(hid)
            tower[o + "attn.q_proj." + kind] = rotate_half_rows(q, cfg.num_attention_heads, cfg.head_dim)
            tower[o + "attn.k_proj." + kind] = rotate_half_rows(k, cfg.num_attention_heads, cfg.head_dim)
            tower[o + "attn.v_proj." + kind] = v
            tower[o + "attn.proj." + kind] = w[p + "wo." + kind]
            tower[o + "norm1." + kind] = w[p + "norm0." + kind]
            tower[o + "norm2." + kind] = w[p + "norm1." + kind]
            tower[o + "mlp.fc1." + kind] = w[p + "mlp.fc0." + kind]
            tower[o + "mlp.fc2." + kind] = w[p + "mlp.fc1." + kind]
    m = V.PROJ
    proj = {}
    for kind in ("weight", "bias"):
        proj["pre_norm." + kind] = w[m + "pre_norm." + kind]
        proj["in_proj." + kind] = w[m + "linear_1." + kind]
        proj["out_proj." + kind] = w[m + "linear_2." + kind]
    return tower, proj


def k25_config(cfg: VisionConfig, text_hidden: int) -> Kimi_K25Config:
    """Kimi_K25Config per docs/model.md §12.2."""
    vision = Kimi_K25VisionConfig(
        patch_size=cfg.patch_size, pos_emb_height=cfg.init_pos_emb_height, pos_emb_width=cfg.init_pos_emb_width,
        num_attention_heads=cfg.num_attention_heads, num_hidden_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, hidden_act="gelu_pytorch_tanh",
        merge_kernel_size=list(cfg.merge_kernel_size),
        rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta}, attn_implementation="eager",
    )
    return Kimi_K25Config(
        vision_config=vision, text_config={"model_type": "deepseek_v3", "hidden_size": text_hidden},
        projection_hidden_size=cfg.hidden_size, projection_layer_norm_eps=1e-5, tie_word_embeddings=False,
    )


class Oracle:
    """transformers' tower + projector loaded with the remapped weights."""

    def __init__(self, w: dict[str, torch.Tensor], cfg: VisionConfig, text_hidden: int):
        full = k25_config(cfg, text_hidden)
        self.tower = Kimi_K25VisionModel(full.vision_config).eval()
        self.proj = Kimi_K25MultimodalProjection(full).eval()
        tower_sd, proj_sd = to_k25(w, cfg)
        self.tower.load_state_dict(tower_sd, strict=False)  # non-persistent buffers (inv_freq, time emb) stay
        missing = set(self.tower.state_dict()) - set(tower_sd)
        assert missing == set(), missing
        self.proj.load_state_dict(proj_sd, strict=True)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(merged tower features [M, 4, hidden], projector output [M, text_hidden]) for packed images."""
        grid_thw = torch.tensor([[1, gh, gw] for gh, gw in grids], dtype=torch.long)
        feats = self.tower(pixel_values, grid_thw).pooler_output
        return feats, self.proj(feats).reshape(feats.shape[0], -1)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    cfg = CONFIGS[request.param]
    w = random_weights(cfg, TEXT_HIDDEN, seed=1234)
    return cfg, w, Oracle(w, cfg, TEXT_HIDDEN)


def pixels(grids: list[tuple[int, int]], cfg: VisionConfig, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = sum(gh * gw for gh, gw in grids)
    return torch.rand(n, 3, cfg.patch_size, cfg.patch_size, generator=g) * 2 - 1


def run_ref(w, cfg, pv, grids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        feats = torch.cat(V.vision_tower(w, cfg, pv, grids))
        return feats, V.projector(w, feats)


def errors(ref: torch.Tensor, ora: torch.Tensor) -> dict[str, float]:
    """Per-token metrics (token = first axis): min cosine, max relative L2 error, max abs error."""
    a, b = ref.reshape(ref.shape[0], -1).double(), ora.reshape(ora.shape[0], -1).double()
    cos = F.cosine_similarity(a, b, dim=-1)
    rel = (a - b).norm(dim=-1) / b.norm(dim=-1)
    return {"cos": cos.min().item(), "rel": rel.max().item(), "abs": (a - b).abs().max().item()}


def passes(m: dict[str, float]) -> bool:
    return m["cos"] >= COS_TOL and m["rel"] <= REL_TOL


# ---------------------------------------------------------------------------------------------------------------
# reference vs oracle

@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_single_image_matches_oracle(model, grid):
    """16x16 = identity pos-emb; 6x10 (down/down), 20x12 (up/down), 2x2 resampled; tower and projector stages."""
    cfg, w, oracle = model
    pv = pixels([grid], cfg, seed=grid[0] * 100 + grid[1])
    ref_feats, ref_out = run_ref(w, cfg, pv, [grid])
    ora_feats, ora_out = oracle(pv, [grid])
    assert ref_feats.shape == ora_feats.shape == (grid[0] * grid[1] // 4, 4, cfg.hidden_size)
    assert ref_out.shape == ora_out.shape == (grid[0] * grid[1] // 4, TEXT_HIDDEN)
    for stage, (r, o) in {"tower": (ref_feats, ora_feats), "projector": (ref_out, ora_out)}.items():
        m = errors(r, o)
        print(f"{cfg.head_dim=} {grid} {stage}: {m}")
        assert m["cos"] >= COS_TOL, (stage, m)
        assert m["rel"] <= REL_TOL, (stage, m)


def test_packed_images_block_diagonal(model):
    """Two packed images: equal to each image alone (block-diagonal attention, §5.3) and to the oracle."""
    cfg, w, oracle = model
    grids = [(6, 10), (4, 4)]
    pv = pixels(grids, cfg, seed=5)
    with torch.no_grad():
        packed = V.vision_tower(w, cfg, pv, grids)
        alone = [V.vision_tower(w, cfg, part, [g])[0] for part, g in zip(pv.split([60, 16]), grids)]
        encoded = V.encode_images(w, cfg, pv, grids)
    assert [t.shape[0] for t in packed] == [15, 4]
    for p, a in zip(packed, alone):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)
    ora_feats, ora_out = oracle(pv, grids)
    for r, o in ((torch.cat(packed), ora_feats), (encoded, ora_out)):
        assert passes(errors(r, o)), errors(r, o)


# ---------------------------------------------------------------------------------------------------------------
# mutations: the oracle comparison must fail for each plausible mistake

def _swap_rope_axes(orig):
    def angles(h: int, w: int, head_dim: int, theta: float) -> torch.Tensor:
        a = orig(h, w, head_dim, theta)
        return a.reshape(h * w, -1, 2).flip(-1).reshape(h * w, -1)  # pair 2i <-> 2i+1: row and column swapped
    return angles


def _bilinear_resample(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = F.interpolate(table.permute(2, 0, 1)[None], size=(h, w), mode="bilinear", align_corners=False)
    return out[0].permute(1, 2, 0).reshape(h * w, -1)


MUTATIONS = {
    "rope_axes_swapped": ("rope2d_angles", lambda: _swap_rope_axes(V.rope2d_angles), True),
    "mlp_gelu_erf": ("gelu_tanh", lambda: V.gelu_erf, False),
    "projector_gelu_tanh": ("gelu_erf", lambda: V.gelu_tanh, False),
    "pos_emb_bilinear": ("pos_emb_resample", lambda: _bilinear_resample, True),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_caught(model, monkeypatch, name):
    """Each mutation must fail the oracle check on a non-square resampled grid.

    RoPE axes and bilinear pos-emb drop the cosine below 0.99999. A GELU swap cannot (|tanh - erf| <= 4.7e-4, so
    1 - cos ~ 3e-8): it is caught by the relative-error bound (~2e-4 vs REL_TOL 2e-5; unmutated ~1e-6).
    """
    cfg, w, oracle = model
    attr, make, cosine_visible = MUTATIONS[name]
    grid = MUTATION_GRID
    pv = pixels([grid], cfg, seed=11)
    ora_feats, ora_out = oracle(pv, [grid])
    assert passes(errors(run_ref(w, cfg, pv, [grid])[1], ora_out))  # unmutated passes
    monkeypatch.setattr(V, attr, make())
    m = errors(run_ref(w, cfg, pv, [grid])[1], ora_out)
    print(f"{name}: {m}")
    assert not passes(m)
    assert m["rel"] > 5 * REL_TOL
    if cosine_visible:
        assert m["cos"] < COS_TOL


# ---------------------------------------------------------------------------------------------------------------
# formulas against independent definitions

@pytest.mark.parametrize("table_hw,out_hw", [
    ((16, 16), (6, 10)), ((16, 16), (20, 12)), ((16, 16), (2, 2)), ((16, 16), (33, 7)),
    ((64, 64), (36, 46)), ((64, 64), (128, 86)), ((12, 20), (5, 41)), ((8, 8), (1, 3)),
])
def test_bicubic_matches_torch_interpolate(table_hw, out_hw):
    """§5.2 matrices vs F.interpolate(bicubic, align_corners=False), float64, down- and up-sampling."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(*table_hw, 5, generator=g, dtype=torch.float64)
    ref = V.pos_emb_resample(table, *out_hw)
    want = F.interpolate(table.permute(2, 0, 1)[None], size=out_hw, mode="bicubic", align_corners=False)
    want = want[0].permute(1, 2, 0).reshape(out_hw[0] * out_hw[1], -1)
    assert ref.dtype == torch.float64
    assert (ref - want).abs().max().item() < 1e-12
    # each matrix row is a partition of unity
    torch.testing.assert_close(V.bicubic_matrix(table_hw[0], out_hw[0]).sum(1),
                               torch.ones(out_hw[0], dtype=torch.float64), rtol=0, atol=1e-14)


def test_pos_emb_same_size_is_identity():
    table = torch.randn(16, 16, 8)
    assert torch.equal(V.pos_emb_resample(table, 16, 16), table.reshape(256, 8))


def test_rope_angles_explicit():
    """§5.4 on a 2x3 grid, head dim 8, theta 100: f = (1, 0.1); patch (r, c) -> [c, r, 0.1c, 0.1r]."""
    a = V.rope2d_angles(2, 3, 8, 100.0)
    want = torch.tensor([[c, r, 0.1 * c, 0.1 * r] for r in range(2) for c in range(3)], dtype=torch.float64)
    torch.testing.assert_close(a.double(), want, rtol=1e-12, atol=1e-12)


def test_apply_rope_is_complex_rotation():
    """Adjacent pairs as complex numbers a + ib multiplied by e^{iθ}."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=g, dtype=torch.float64)
    ang = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    z = torch.view_as_complex(x.reshape(5, 3, 4, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)[:, None]
    torch.testing.assert_close(V.apply_rope_interleaved(x, ang), torch.view_as_real(z).reshape(5, 3, 8))


def test_merge_order():
    """§5.5: token (a, b) = patches (2a,2b), (2a,2b+1), (2a+1,2b), (2a+1,2b+1) of a row-major gh x gw grid."""
    gh, gw = 4, 6
    ids = torch.arange(gh * gw, dtype=torch.float32)[:, None]
    got = V.merge_2x2(ids, gh, gw)[..., 0]
    want = [[2 * a * gw + 2 * b, 2 * a * gw + 2 * b + 1, (2 * a + 1) * gw + 2 * b, (2 * a + 1) * gw + 2 * b + 1]
            for a in range(gh // 2) for b in range(gw // 2)]
    assert got.tolist() == want


def test_gelus_match_torch():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(V.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(V.gelu_erf(x), F.gelu(x))


@pytest.mark.parametrize("grids,n", [([(3, 4)], 12), ([(4, 4), (2, 5)], 26), ([(4, 4)], 15), ([(0, 4)], 0)])
def test_bad_grids_rejected(grids, n):
    cfg = CFG_TINY
    w = {}  # validation happens before any weight is read
    with pytest.raises(ValueError):
        V.vision_tower(w, cfg, torch.zeros(n, 3, 14, 14), grids)


def test_grid_over_rope_table_rejected():
    cfg = dataclasses.replace(CFG_TINY, rope_max_grid=8)
    with pytest.raises(ValueError, match="RoPE"):
        V.vision_tower({}, cfg, torch.zeros(40, 3, 14, 14), [(10, 4)])
