"""Model configuration: small dataclasses built once from a checkpoint's config.json.

Values the code needs are read from the files (docs/model.md §2, §13); the dataclass defaults are never used to
fill in a missing key of a real checkpoint: a missing key is a CheckpointError. The presets of the synthetic
checkpoints (``tiny``, ``a3b``) live in ``kimivl_edge.synth.presets``.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CheckpointError, read_json_object

# The three Kimi-VL-A3B variants and their recommended sampling temperature (docs/model.md §1); the converter
# writes it as general.sampling.temp.
TEMPERATURE = {"instruct": 0.2, "thinking": 0.8, "thinking-2506": 0.8}
VARIANTS = tuple(TEMPERATURE)
# MoonViT's 2-D RoPE table is ROPE_MAX_GRID x ROPE_MAX_GRID patches, hard-coded in the HF code (docs/model.md §5.4):
# the vision model takes grid sides 1..512; the HF processor refuses sides >= 512 ("Exceed pos emb", §4 step 4).
ROPE_MAX_GRID = 512


@dataclass(frozen=True)
class VisionConfig:
    """MoonViT tower + 2x2 merge (config.json ``vision_config``)."""

    patch_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    init_pos_emb_height: int
    init_pos_emb_width: int
    merge_kernel_size: tuple[int, int]
    # Hard-coded in the HF code, not in the file (docs/model.md §2).
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_max_grid: int = ROPE_MAX_GRID

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_area(self) -> int:
        return self.merge_kernel_size[0] * self.merge_kernel_size[1]


@dataclass(frozen=True)
class TextConfig:
    """DeepSeek-V3-style MoE decoder (config.json ``text_config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    scoring_func: str
    topk_method: str
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    hidden_act: str
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    # HF's DeepseekV3RMSNorm default for kv_a_layernorm: not in the file (docs/model.md §9.3).
    kv_a_layernorm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0


@dataclass(frozen=True)
class KimiVLConfig:
    vision: VisionConfig
    text: TextConfig
    media_placeholder_token_id: int
    raw: dict  # the whole config.json, for writing it back and for metadata

    @classmethod
    def from_dict(cls, d: dict) -> "KimiVLConfig":
        try:
            if d.get("model_type") != "kimi_vl":
                raise CheckpointError(f"config.json: model_type is {d.get('model_type')!r}, expected 'kimi_vl'")
            if "KimiVLForConditionalGeneration" not in (d.get("architectures") or []):
                raise CheckpointError(f"config.json: unsupported architectures {d.get('architectures')!r} "
                                      "(expected KimiVLForConditionalGeneration)")
            vc, tc = d["vision_config"], d["text_config"]
            if not isinstance(vc, dict) or not isinstance(tc, dict):
                raise TypeError("not JSON objects")
            vision = VisionConfig(**_required(VisionConfig, vc, "vision_config") |
                                  {"merge_kernel_size": tuple(vc["merge_kernel_size"])})
            text = TextConfig(**_required(TextConfig, tc, "text_config"))
            media = _checked("media_placeholder_token_id", "int", d["media_placeholder_token_id"])
        except KeyError as e:
            raise CheckpointError(f"config.json: missing key {e.args[0]!r}") from None
        except TypeError as e:
            raise CheckpointError(f"config.json: malformed vision_config/text_config ({e})") from None
        _check(vision, text)
        return cls(vision=vision, text=text, media_placeholder_token_id=media, raw=d)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "KimiVLConfig":
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{ckpt_dir}: no config.json (not a Hugging Face checkpoint directory)")
        return cls.from_dict(read_json_object(path))


def _required(cls, d: dict, where: str) -> dict:
    """The fields of ``cls`` that the file must provide (those without a code default), each of its annotated type
    and range; KeyError if absent."""
    return {f.name: _checked(f"{where}.{f.name}", str(f.type), d[f.name])
            for f in fields(cls) if f.default is MISSING and f.name != "merge_kernel_size"}


# Loops run over these counts (the tensor list has layers x experts entries): bounded so a hostile config.json
# cannot make the checkpoint reader run for hours. llama.cpp's own limits (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS).
_MAX_COUNT = {"num_hidden_layers": 512, "n_routed_experts": 1024}
_MAY_BE_ZERO = ("first_k_dense_replace", "n_shared_experts", "bos_token_id", "eos_token_id", "pad_token_id",
                "media_placeholder_token_id")
_MAX_INT = 2**31 - 1


def _checked(key: str, annotation: str, v: Any) -> Any:
    """``v`` if it is of the field's type: ints are integers (not booleans) in 1..2^31-1 (0 allowed for offsets and
    ids), floats are finite numbers; CheckpointError (one line) otherwise."""
    kinds = annotation.split(" | ")
    name = key.rsplit(".", 1)[-1]
    if v is None and "None" in kinds:
        return v
    if "int" in kinds and isinstance(v, int) and not isinstance(v, bool):
        lo = 0 if name in _MAY_BE_ZERO else 1
        if lo <= v <= _MAX_COUNT.get(name, _MAX_INT):
            return v
        raise CheckpointError(f"config.json: {key} = {v} is out of range ({lo}..{_MAX_COUNT.get(name, _MAX_INT)})")
    ok = ("float" in kinds and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) or \
        ("bool" in kinds and isinstance(v, bool)) or ("str" in kinds and isinstance(v, str)) or \
        ("dict" in kinds and isinstance(v, dict))
    if not ok:
        raise CheckpointError(f"config.json: {key} = {str(v)[:40]!r} is not of type {annotation}")
    return v


def _check(v: VisionConfig, t: TextConfig) -> None:
    """Structural facts the code relies on; a violation means the file is not a Kimi-VL config."""
    problems = []
    if v.hidden_size % v.num_attention_heads or v.head_dim % 4:
        problems.append("vision head dim must divide hidden_size and be a multiple of 4 (2-D RoPE)")
    if tuple(v.merge_kernel_size) != (2, 2):
        problems.append(f"merge_kernel_size {v.merge_kernel_size} (only [2, 2] exists)")
    if t.q_lora_rank is not None:
        problems.append("q_lora_rank must be null (Kimi-VL has no q LoRA)")
    if t.num_experts_per_tok > t.n_routed_experts:
        problems.append("num_experts_per_tok > n_routed_experts")
    if t.scoring_func != "sigmoid" or t.topk_method != "noaux_tc":
        problems.append(f"router {t.scoring_func}/{t.topk_method} (expected sigmoid/noaux_tc)")
    if t.rope_scaling is not None:
        problems.append("rope_scaling must be null")
    if t.qk_rope_head_dim % 2:
        problems.append("qk_rope_head_dim must be even")
    if problems:
        raise CheckpointError("config.json: " + "; ".join(problems))

