"""What the compute must move: weight bytes read per decoded token (by tensor role, from the text GGUF's tensor
index; llama.cpp's deepseek2 tensor names, docs/model.md §3.3, §11), KV-cache bytes per token, and the FLOPs of one
image through the vision tower (docs/model.md §5, §6)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from gguf import Keys

from ..gguf_file import GGUFFile, TensorInfo

ROLES = ("attention", "dense_ffn", "shared_experts", "routed_experts", "router", "norms", "head", "embedding_row",
         "other")
KV_BYTES_PER_VALUE = 2.0  # an f16 KV cache, as Decoder's default


def tensor_role(name: str) -> str:
    """What a deepseek2 GGUF tensor is, for the roofline (docs/model.md §9, §11 names)."""
    if name == "token_embd.weight":
        return "embedding_row"
    if name == "output.weight":
        return "head"
    if "norm" in name:
        return "norms"
    if not name.startswith("blk."):
        return "other"
    return _block_role(name.split(".", 2)[2])


def _block_role(leaf: str) -> str:
    """The role of ``blk.N.<leaf>``."""
    if leaf.startswith(("ffn_gate_inp.", "exp_probs_b.")):
        return "router"
    if leaf.startswith("attn_"):
        return "attention"
    if "_exps." in leaf:
        return "routed_experts"
    if "_shexp." in leaf:
        return "shared_experts"
    if leaf.startswith("ffn_"):
        return "dense_ffn"
    return "other"


def _bytes_read(t: TensorInfo, role: str, n_expert: int, n_expert_used: int) -> int:
    """Bytes of ``t`` one decoded token reads."""
    if role == "embedding_row":
        return t.nbytes // t.ne[1]
    if role == "routed_experts":
        if t.ne[-1] != n_expert or t.nbytes % n_expert:
            raise ValueError(f"{t.name}: ne {t.ne} does not stack {n_expert} experts")
        return t.nbytes // n_expert * n_expert_used
    return t.nbytes


def bytes_per_token(tensors: Sequence[TensorInfo], n_expert: int, n_expert_used: int) -> dict[str, int]:
    """Weight bytes one decoded token reads, by role, and their ``total``.

    Every tensor is read whole, except: the token embedding (one row: bytes / ne[1]) and the routed experts (each
    ``*_exps`` tensor stacks ``n_expert`` equal slices along its last axis; a token reads ``n_expert_used`` of them,
    docs/model.md §9.5). Norms, router and biases are read whole. The KV cache is not a weight (see
    ``kv_bytes_per_token``)."""
    if not 0 < n_expert_used <= n_expert:
        raise ValueError(f"n_expert_used {n_expert_used} must be in 1..n_expert ({n_expert})")
    out = dict.fromkeys(ROLES, 0)
    for t in tensors:
        role = tensor_role(t.name)
        out[role] += _bytes_read(t, role, n_expert, n_expert_used)
    out["total"] = sum(out[r] for r in ROLES)
    return out


def kv_bytes_per_token(n_layer: int, n_past: int, values_per_position: int,
                       bytes_per_value: float = KV_BYTES_PER_VALUE) -> int:
    """KV-cache bytes one decoded token reads: every cached position of every layer (MLA caches
    ``values_per_position`` = kv_lora_rank + rope dim = 576 values per position and layer, docs/model.md §9.4)."""
    return int(n_layer * n_past * values_per_position * bytes_per_value)


@dataclass(frozen=True)
class RooflineModel:
    """What the roofline needs from a text GGUF: its tensor index, the experts a token uses, the KV layout."""

    tensors: tuple[TensorInfo, ...]
    n_expert: int
    n_expert_used: int
    n_layer: int
    kv_values_per_position: int  # MLA: kv_lora_rank + rope dim, llama.cpp's deepseek2 key_length

    @classmethod
    def read(cls, path: str | os.PathLike) -> RooflineModel:
        with GGUFFile(path) as f:
            arch = f.metadata[Keys.General.ARCHITECTURE]

            def val(key: str, default: int | None = None) -> int | None:
                return f.get(key.format(arch=arch), default)

            return cls(tensors=tuple(f.tensors.values()), n_expert=int(val(Keys.LLM.EXPERT_COUNT, 1) or 1),
                       n_expert_used=int(val(Keys.LLM.EXPERT_USED_COUNT, 1) or 1),
                       n_layer=int(f.metadata[Keys.LLM.BLOCK_COUNT.format(arch=arch)]),
                       kv_values_per_position=int(val(Keys.Attention.KEY_LENGTH, 0) or 0))

    def bytes_per_token(self) -> dict[str, int]:
        return bytes_per_token(self.tensors, self.n_expert, self.n_expert_used)

    def kv_bytes_per_token(self, n_past: int) -> int:
        return kv_bytes_per_token(self.n_layer, n_past, self.kv_values_per_position)


# ---------------------------------------------------------------------------------------------------------------
# vision FLOPs (docs/model.md §5, §6): multiply-adds count 2; softmax, norms, activations, RoPE are not counted

def vision_flops(grid: tuple[int, int], hidden: int, layers: int, intermediate: int, patch: int, merge: int,
                 projection_dim: int) -> int:
    """FLOPs of the matrix products of one image: patch embedding, per layer QKV, scores, weights·V, output
    projection and the MLP, then the 2x2-merged projector."""
    n = grid[0] * grid[1]
    d = hidden
    per_layer = 2 * n * d * 3 * d + 2 * n * n * d + 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * intermediate
    m, dm = n // (merge * merge), d * merge * merge
    projector = 2 * m * dm * dm + 2 * m * dm * projection_dim
    return 2 * n * 3 * patch * patch * d + layers * per_layer + projector
