"""An HF Kimi-VL checkpoint directory: its expected tensor layout, and a validating, memory-mapped reader.

The layout (names and shapes, docs/model.md §3) is a function of config.json alone, so the synthetic writer, the
loader's consistency check and the converter's plan all share ``hf_tensor_specs``. Nothing here imports code from the
checkpoint: the ``*.py`` files of a download are never read.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .config import KimiVLConfig
from .errors import CheckpointError, read_json_object
from .safetensors_io import SafetensorsFile, bf16_to_f32

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files every Kimi-VL download has besides the weights (data only; the remote code files are ignored).
REQUIRED_FILES = ("config.json", "tiktoken.model", "tokenizer_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    part: str  # "vision" | "projector" | "text"


def hf_tensor_specs(cfg: KimiVLConfig) -> list[TensorSpec]:
    """Every tensor of the HF checkpoint, in a canonical order (vision, projector, language model)."""
    v, t = cfg.vision, cfg.text
    out: list[TensorSpec] = []

    def add(name: str, shape, part: str) -> None:
        out.append(TensorSpec(name, tuple(int(s) for s in shape), part))

    D, p = v.hidden_size, v.patch_size
    add("vision_tower.patch_embed.proj.weight", (D, 3, p, p), "vision")
    add("vision_tower.patch_embed.proj.bias", (D,), "vision")
    add("vision_tower.patch_embed.pos_emb.weight", (v.init_pos_emb_height, v.init_pos_emb_width, D), "vision")
    for i in range(v.num_hidden_layers):
        b = f"vision_tower.encoder.blocks.{i}."
        for norm in ("norm0", "norm1"):
            add(b + norm + ".weight", (D,), "vision")
            add(b + norm + ".bias", (D,), "vision")
        add(b + "wqkv.weight", (3 * D, D), "vision")
        add(b + "wqkv.bias", (3 * D,), "vision")
        add(b + "wo.weight", (D, D), "vision")
        add(b + "wo.bias", (D,), "vision")
        add(b + "mlp.fc0.weight", (v.intermediate_size, D), "vision")
        add(b + "mlp.fc0.bias", (v.intermediate_size,), "vision")
        add(b + "mlp.fc1.weight", (D, v.intermediate_size), "vision")
        add(b + "mlp.fc1.bias", (D,), "vision")
    add("vision_tower.encoder.final_layernorm.weight", (D,), "vision")
    add("vision_tower.encoder.final_layernorm.bias", (D,), "vision")

    M = D * v.merge_area
    add("multi_modal_projector.pre_norm.weight", (D,), "projector")
    add("multi_modal_projector.pre_norm.bias", (D,), "projector")
    add("multi_modal_projector.linear_1.weight", (M, M), "projector")
    add("multi_modal_projector.linear_1.bias", (M,), "projector")
    add("multi_modal_projector.linear_2.weight", (t.hidden_size, M), "projector")
    add("multi_modal_projector.linear_2.bias", (t.hidden_size,), "projector")

    H = t.hidden_size
    add("language_model.model.embed_tokens.weight", (t.vocab_size, H), "text")
    for i in range(t.num_hidden_layers):
        L = f"language_model.model.layers.{i}."
        add(L + "input_layernorm.weight", (H,), "text")
        add(L + "post_attention_layernorm.weight", (H,), "text")
        add(L + "self_attn.q_proj.weight", (t.num_attention_heads * t.qk_head_dim, H), "text")
        add(L + "self_attn.kv_a_proj_with_mqa.weight", (t.kv_lora_rank + t.qk_rope_head_dim, H), "text")
        add(L + "self_attn.kv_a_layernorm.weight", (t.kv_lora_rank,), "text")
        add(L + "self_attn.kv_b_proj.weight",
            (t.num_attention_heads * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank), "text")
        add(L + "self_attn.o_proj.weight", (H, t.num_attention_heads * t.v_head_dim), "text")
        add(L + "self_attn.rotary_emb.inv_freq", (t.qk_rope_head_dim // 2,), "text")
        if not t.is_moe_layer(i):
            add(L + "mlp.gate_proj.weight", (t.intermediate_size, H), "text")
            add(L + "mlp.up_proj.weight", (t.intermediate_size, H), "text")
            add(L + "mlp.down_proj.weight", (H, t.intermediate_size), "text")
            continue
        add(L + "mlp.gate.weight", (t.n_routed_experts, H), "text")
        add(L + "mlp.gate.e_score_correction_bias", (t.n_routed_experts,), "text")
        F = t.moe_intermediate_size
        for e in range(t.n_routed_experts):
            x = L + f"mlp.experts.{e}."
            add(x + "gate_proj.weight", (F, H), "text")
            add(x + "up_proj.weight", (F, H), "text")
            add(x + "down_proj.weight", (H, F), "text")
        S = F * t.n_shared_experts
        add(L + "mlp.shared_experts.gate_proj.weight", (S, H), "text")
        add(L + "mlp.shared_experts.up_proj.weight", (S, H), "text")
        add(L + "mlp.shared_experts.down_proj.weight", (H, S), "text")
    add("language_model.model.norm.weight", (H,), "text")
    add("language_model.lm_head.weight", (t.vocab_size, H), "text")
    return out


class Checkpoint:
    """A validated HF Kimi-VL checkpoint directory; tensors are read lazily from memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        missing = [f for f in REQUIRED_FILES if not (self.path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing {', '.join(missing)}")
        self.config = KimiVLConfig.from_checkpoint(self.path)
        self.weight_map = self._read_weight_map()
        self._shards: dict[str, SafetensorsFile] = {}
        self._validate()

    # -- files ------------------------------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            wm = read_json_object(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)")
            # shard names are plain file names in this directory (never a path that leads out of it)
            bad = [s for s in wm.values() if not isinstance(s, str) or Path(s).name != s or s in ("", ".", "..")]
            if bad:
                raise CheckpointError(f"{index}: weight_map names a shard {str(bad[0])[:80]!r} that is not a file "
                                      "name in the checkpoint directory")
            missing = sorted({s for s in wm.values() if not (self.path / s).is_file()})
            if missing:
                raise CheckpointError(f"{self.path}: {INDEX_FILE} names missing shard(s) {', '.join(missing)}")
            return dict(wm)
        if (self.path / SINGLE_FILE).is_file():
            return {n: SINGLE_FILE for n in SafetensorsFile(self.path / SINGLE_FILE).entries}
        raise CheckpointError(f"{self.path}: no {INDEX_FILE} or {SINGLE_FILE}")

    def shard(self, filename: str) -> SafetensorsFile:
        if filename not in self._shards:
            self._shards[filename] = SafetensorsFile(self.path / filename)
        return self._shards[filename]

    def _validate(self) -> None:
        """Every expected tensor is listed, present in its shard, with the shape config.json implies."""
        specs = hf_tensor_specs(self.config)
        expected = {s.name: s.shape for s in specs}
        absent = [n for n in expected if n not in self.weight_map]
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise CheckpointError(f"{self.path}: tensor {absent[0]} missing{more}")
        for name, shard in self.weight_map.items():
            st = self.shard(shard)
            if name not in st.entries:
                raise CheckpointError(f"{shard}: index lists {name} but the shard does not contain it")
            if name in expected and st.shape(name) != expected[name]:
                raise CheckpointError(
                    f"{shard}: {name} has shape {list(st.shape(name))}, config.json implies {list(expected[name])}")

    # -- tensors ----------------------------------------------------------------------------------------------
    @cached_property
    def names(self) -> list[str]:
        return [s.name for s in hf_tensor_specs(self.config)]

    def dtype(self, name: str) -> str:
        return self.shard(self.weight_map[name]).dtype(name)

    def raw(self, name: str) -> np.ndarray:
        return self.shard(self.weight_map[name]).raw(name)

    def float32(self, name: str) -> np.ndarray:
        return self.shard(self.weight_map[name]).float32(name)

    def row_blocks(self, name: str, max_bytes: int = 8 << 20) -> Iterator[Callable[[], np.ndarray]]:
        """The tensor as deferred float32 blocks of whole rows (last axis), at most ``max_bytes`` each: every item is
        a function that reads its rows with pread (not the memory map: the resident set stays a few blocks however
        large the checkpoint) and widens them. The caller decides which thread does the work."""
        st = self.shard(self.weight_map[name])
        shape = st.shape(name)
        ne0 = int(shape[-1]) if shape else 1
        n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        step = max(1, max_bytes // (4 * ne0))
        bf16 = self.dtype(name) == "BF16"

        def block(a: int, b: int) -> np.ndarray:
            rows = st.read_rows(name, a, b)
            return bf16_to_f32(rows) if bf16 else rows.astype(np.float32)

        for a in range(0, n_rows, step):
            yield functools.partial(block, a, min(a + step, n_rows))
