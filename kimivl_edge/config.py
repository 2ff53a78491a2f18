"""Model configuration: small dataclasses built once from a checkpoint's config.json.

Values the code needs are read from the files (reference doc §2, §13); the dataclass defaults are never used to
fill in a missing key of a real checkpoint: a missing key is a CheckpointError.
Two presets describe the synthetic checkpoints: ``a3b`` (the real Kimi-VL-A3B dimensions) and ``tiny``.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .errors import CheckpointError, read_json_object

VARIANTS = ("instruct", "thinking", "thinking-2506")
# MoonViT's 2-D RoPE table is ROPE_MAX_GRID x ROPE_MAX_GRID patches, hard-coded in the HF code (reference doc §5.4):
# the vision model takes grid sides 1..512; the HF processor refuses sides >= 512 ("Exceed pos emb", §4 step 4).
ROPE_MAX_GRID = 512
PRESETS = ("tiny", "a3b")


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
    # Hard-coded in the HF code, not in the file (reference doc §2).
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
    # HF's DeepseekV3RMSNorm default for kv_a_layernorm: not in the file (reference doc §9.3).
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
            vision = VisionConfig(**_required(VisionConfig, vc) | {"merge_kernel_size": tuple(vc["merge_kernel_size"])})
            text = TextConfig(**_required(TextConfig, tc))
            media = int(d["media_placeholder_token_id"])
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


def _required(cls, d: dict) -> dict:
    """The fields of ``cls`` that the file must provide (those without a code default); KeyError if absent."""
    return {f.name: d[f.name] for f in fields(cls) if f.default is MISSING}


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


# ----------------------------------------------------------------------------------------------------------------
# Presets for synthetic checkpoints. a3b = the real dimensions (reference doc §2); tiny = every structural feature
# at a few MB: >= 3 vision layers, a pos-emb grid that real images resample, >= 2 MoE layers after one dense layer,
# 8 routed experts top-2, a shared expert, MLA without q LoRA, untied head. Text matrices have rows that are
# multiples of 256 so K-quants apply, while the expert down projection (128) and attn_k_b (32) fall back like the
# real 1408 and 128; the vision MLP width (304 = 9.5 x 32) forces vision ffn_down to F16 like the real 4304.

_A3B = dict(
    vision=dict(patch_size=14, hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                intermediate_size=4304, init_pos_emb_height=64, init_pos_emb_width=64),
    text=dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
              num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
              num_experts_per_tok=6, routed_scaling_factor=2.446, kv_lora_rank=512, qk_nope_head_dim=128,
              qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=131072),
    base_vocab=163584,
)

_TINY = dict(
    vision=dict(patch_size=14, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=304, init_pos_emb_height=16, init_pos_emb_width=16),
    text=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=8, n_shared_experts=1, n_routed_experts=8,
              num_experts_per_tok=2, routed_scaling_factor=2.446, kv_lora_rank=256, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=4096),
    base_vocab=768,
)

PRESET_DIMS = {"a3b": _A3B, "tiny": _TINY}

# Offsets of the named special tokens from the first special id (= the base vocabulary size), as in the real
# tokenizer_config.json; every other id of the 256-token special block is <|reserved_token_{id}|>.
SPECIAL_TOKEN_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|im_middle|>": 17, "<|media_start|>": 18, "<|media_content|>": 19, "<|media_end|>": 20,
    "<|media_pad|>": 21, "[UNK]": 254, "[PAD]": 255,
}
N_SPECIAL = 256


def preset_config_dict(preset: str, variant: str = "instruct") -> dict:
    """The full config.json of a synthetic checkpoint, with every key of the real file."""
    if preset not in PRESET_DIMS:
        raise ValueError(preset)
    if variant not in VARIANTS:
        raise ValueError(variant)
    p = PRESET_DIMS[preset]
    base = p["base_vocab"]
    text = dict(
        p["text"],
        num_key_value_heads=p["text"]["num_attention_heads"],
        q_lora_rank=None, first_k_dense_replace=1, moe_layer_freq=1, n_group=1, topk_group=1,
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", rms_norm_eps=1e-5,
        rope_theta=800000.0, rope_scaling=None, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=base + SPECIAL_TOKEN_OFFSETS["[BOS]"], eos_token_id=base + SPECIAL_TOKEN_OFFSETS["[EOS]"],
        pad_token_id=base + SPECIAL_TOKEN_OFFSETS["[PAD]"],
        ep_size=1, aux_loss_alpha=0.001, seq_aux=True, attention_bias=False, attention_dropout=0.0,
        initializer_range=0.02, pretraining_tp=1, use_cache=True, torch_dtype="bfloat16",
    )
    assert text["vocab_size"] == base + N_SPECIAL
    vision = dict(p["vision"], model_type="moonvit", merge_kernel_size=[2, 2], torch_dtype="bfloat16")
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_vl.KimiVLConfig",
            "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration",
        },
        "model_type": "kimi_vl",
        "vision_config": vision,
        "text_config": text,
        "ignore_index": -100,
        "media_placeholder_token_id": base + SPECIAL_TOKEN_OFFSETS["<|media_pad|>"],
        "vocab_size": text["vocab_size"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.3",
    }


def preset_config(preset: str, variant: str = "instruct") -> KimiVLConfig:
    return KimiVLConfig.from_dict(preset_config_dict(preset, variant))


def as_json(cfg: KimiVLConfig) -> str:
    return json.dumps(cfg.raw, indent=2)


__all__ = ["VisionConfig", "TextConfig", "KimiVLConfig", "preset_config", "preset_config_dict", "asdict"]
