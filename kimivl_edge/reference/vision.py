"""fp32 PyTorch reference of MoonViT + 2x2 patch merge + MLP projector (docs/model.md §5, §6).

Functional style over a weight dict keyed by the Hugging Face checkpoint names (docs/model.md §3.1, §3.2), e.g.
``vision_tower.patch_embed.proj.weight`` ... ``multi_modal_projector.linear_2.bias``, all float32. Every formula
is one small module-level function, looked up by name at call time, so a test can replace any one of them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..config import VisionConfig

Weights = Mapping[str, torch.Tensor]

TOWER = "vision_tower."
BLOCK = TOWER + "encoder.blocks.{}."
PROJ = "multi_modal_projector."
BICUBIC_A = -0.75  # PyTorch's bicubic coefficient (docs/model.md §5.2)


# ---------------------------------------------------------------------------------------------------------------
# §5.2 position embedding: exact PyTorch bicubic as two resampling matrices

def cubic_kernel(d: torch.Tensor, a: float = BICUBIC_A) -> torch.Tensor:
    """Keys' cubic convolution kernel K(d) with PyTorch's A = -0.75 (docs/model.md §5.2)."""
    d = d.abs()
    near = (a + 2) * d**3 - (a + 3) * d**2 + 1
    far = a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64 matrix of 1-D bicubic resampling, align_corners=False, clamped taps (§5.2)."""
    i = torch.arange(n_out, dtype=torch.float64)
    u = (i + 0.5) * (n_in / n_out) - 0.5  # not clamped
    u0 = torch.floor(u)
    t = u - u0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    for offset, dist in ((-1, 1 + t), (0, t), (1, 1 - t), (2, 2 - t)):
        tap = (u0 + offset).clamp(0, n_in - 1).long()
        m.index_put_((rows, tap), cubic_kernel(dist), accumulate=True)  # clamped taps add up
    return m


def pos_emb_resample(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Resample the pos-emb table [H0, W0, C] (axis 0 = row) to an h x w grid, row-major [h*w, C] (§5.2).

    out[:, :, c] = M_h · T[:, :, c] · M_wᵀ, computed in float64 and returned in the table's dtype.
    """
    h0, w0, c = table.shape
    m_h, m_w = bicubic_matrix(h0, h), bicubic_matrix(w0, w)
    out = torch.einsum("ia,abc,jb->ijc", m_h, table.to(torch.float64), m_w)
    return out.reshape(h * w, c).to(table.dtype)


# ---------------------------------------------------------------------------------------------------------------
# §5.4 2-D RoPE on adjacent pairs

def rope2d_angles(h: int, w: int, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angle of each adjacent pair, [h*w, head_dim//2] float64, patches row-major (docs/model.md §5.4).

    f_i = theta^(-4i/head_dim); pair 2i turns by c·f_i (column, width), pair 2i+1 by r·f_i (row, height).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    f = theta ** (-4.0 * torch.arange(head_dim // 4, dtype=torch.float64) / head_dim)
    r = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    c = torch.arange(w, dtype=torch.float64).repeat(h)
    return torch.stack([c[:, None] * f, r[:, None] * f], dim=-1).reshape(h * w, head_dim // 2)


def apply_rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2k, 2k+1) of x [L, heads, d] by angles [L, d//2]:
    (a, b) -> (a cos - b sin, a sin + b cos)."""
    cos = torch.cos(angles).to(x.dtype)[:, None, :]
    sin = torch.sin(angles).to(x.dtype)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------------------------
# elementwise pieces

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis (biased variance)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715x³))): the vision MLP activation (docs/model.md §5.3)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU 0.5·x·(1 + erf(x/√2)): the projector activation (docs/model.md §6)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ + b with W [out, in]."""
    y = x @ weight.T
    return y if bias is None else y + bias


# ---------------------------------------------------------------------------------------------------------------
# §5.1, §5.3, §5.5 the tower

def check_grids(cfg: VisionConfig, grid_hws: list[tuple[int, int]], n_patches: int) -> None:
    """Grid sides must be even (2x2 merge) and within the RoPE table; patch count must match."""
    for gh, gw in grid_hws:
        if gh < 2 or gw < 2 or gh % 2 or gw % 2:
            raise ValueError(f"grid {gh}x{gw}: sides must be even and >= 2 for the 2x2 merge")
        if gh > cfg.rope_max_grid or gw > cfg.rope_max_grid:
            raise ValueError(f"grid {gh}x{gw} exceeds the {cfg.rope_max_grid}x{cfg.rope_max_grid} RoPE table")
    total = sum(gh * gw for gh, gw in grid_hws)
    if total != n_patches:
        raise ValueError(f"grids hold {total} patches but pixel_values has {n_patches}")


def patch_embed(weights: Weights, pixel_values: torch.Tensor) -> torch.Tensor:
    """Conv2d with stride = kernel as a linear map on the (channel, row, column)-flattened patch (§5.1, §3.4)."""
    w = weights[TOWER + "patch_embed.proj.weight"]
    return linear(pixel_values.reshape(pixel_values.shape[0], -1), w.reshape(w.shape[0], -1),
                  weights[TOWER + "patch_embed.proj.bias"])


def image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax(q kᵀ/√d) v within one image; q, k, v [n, heads, d] -> [n, heads*d] (§5.3)."""
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    o = torch.softmax(scores, dim=-1) @ v
    return o.transpose(0, 1).reshape(o.shape[1], -1)


def vision_block(weights: Weights, i: int, cfg: VisionConfig, x: torch.Tensor, angles: torch.Tensor,
                 seqlens: list[int]) -> torch.Tensor:
    """One pre-norm block (§5.3): LN, fused qkv, RoPE on q and k, attention per image, wo, LN, GELU-tanh MLP."""
    p = BLOCK.format(i)
    heads, d = cfg.num_attention_heads, cfg.head_dim
    y = layer_norm(x, weights[p + "norm0.weight"], weights[p + "norm0.bias"], cfg.layer_norm_eps)
    qkv = linear(y, weights[p + "wqkv.weight"], weights[p + "wqkv.bias"])
    q, k, v = (t.reshape(-1, heads, d) for t in qkv.split(cfg.hidden_size, dim=-1))
    q, k = apply_rope_interleaved(q, angles), apply_rope_interleaved(k, angles)
    outs, start = [], 0
    for n in seqlens:  # block-diagonal: each image attends to itself only (§10.1)
        outs.append(image_attention(q[start:start + n], k[start:start + n], v[start:start + n]))
        start += n
    x = x + linear(torch.cat(outs), weights[p + "wo.weight"], weights[p + "wo.bias"])
    y = layer_norm(x, weights[p + "norm1.weight"], weights[p + "norm1.bias"], cfg.layer_norm_eps)
    y = gelu_tanh(linear(y, weights[p + "mlp.fc0.weight"], weights[p + "mlp.fc0.bias"]))
    return x + linear(y, weights[p + "mlp.fc1.weight"], weights[p + "mlp.fc1.bias"])


def merge_2x2(x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """[gh*gw, C] row-major -> [(gh/2)(gw/2), 4, C]; token (a, b) = patches TL, TR, BL, BR of its 2x2 cell (§5.5)."""
    c = x.shape[-1]
    x = x.reshape(gh // 2, 2, gw // 2, 2, c).permute(0, 2, 1, 3, 4)
    return x.reshape((gh // 2) * (gw // 2), 4, c)


def vision_tower(weights: Weights, cfg: VisionConfig, pixel_values: torch.Tensor,
                 grid_hws: list[tuple[int, int]]) -> list[torch.Tensor]:
    """MoonViT on packed images (§5): returns one [gh·gw/4, 4, hidden] tensor per image."""
    grid_hws = [(int(gh), int(gw)) for gh, gw in grid_hws]
    check_grids(cfg, grid_hws, pixel_values.shape[0])
    x = patch_embed(weights, pixel_values.to(torch.float32))
    table = weights[TOWER + "patch_embed.pos_emb.weight"]
    x = x + torch.cat([pos_emb_resample(table, gh, gw) for gh, gw in grid_hws])
    angles = torch.cat([rope2d_angles(gh, gw, cfg.head_dim, cfg.rope_theta) for gh, gw in grid_hws])
    seqlens = [gh * gw for gh, gw in grid_hws]
    for i in range(cfg.num_hidden_layers):
        x = vision_block(weights, i, cfg, x, angles, seqlens)
    x = layer_norm(x, weights[TOWER + "encoder.final_layernorm.weight"],
                   weights[TOWER + "encoder.final_layernorm.bias"], cfg.layer_norm_eps)
    return [merge_2x2(part, gh, gw) for part, (gh, gw) in zip(x.split(seqlens), grid_hws)]


# ---------------------------------------------------------------------------------------------------------------
# §6 projector

def projector(weights: Weights, feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """[N, 4, hidden] -> [N, text_hidden]: LN per patch vector, concat [TL|TR|BL|BR], linear, erf GELU, linear (§6)."""
    h = layer_norm(feats, weights[PROJ + "pre_norm.weight"], weights[PROJ + "pre_norm.bias"], eps)
    h = h.reshape(h.shape[0], -1)
    h = gelu_erf(linear(h, weights[PROJ + "linear_1.weight"], weights[PROJ + "linear_1.bias"]))
    return linear(h, weights[PROJ + "linear_2.weight"], weights[PROJ + "linear_2.bias"])


def encode_images(weights: Weights, cfg: VisionConfig, pixel_values: torch.Tensor,
                  grid_hws: list[tuple[int, int]]) -> torch.Tensor:
    """Tower + projector: the rows that replace the <|media_pad|> embeddings, [Σ gh·gw/4, text_hidden]
    (§5, §6, §9.1)."""
    feats = vision_tower(weights, cfg, pixel_values, grid_hws)
    return projector(weights, torch.cat(feats))


__all__ = [
    "cubic_kernel", "bicubic_matrix", "pos_emb_resample", "rope2d_angles", "apply_rope_interleaved",
    "layer_norm", "gelu_tanh", "gelu_erf", "patch_embed", "vision_block", "merge_2x2", "vision_tower",
    "projector", "encode_images",
]
