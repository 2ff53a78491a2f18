"""The synthetic checkpoints' presets (``tiny``, ``a3b``) and their small files: config.json,
generation_config.json and preprocessor_config.json, per variant, with every key of the real files.
"""
from __future__ import annotations

from typing import Any

from ..config import VARIANTS, KimiVLConfig
from ..errors import UsageError
from ..tokenizer import N_SPECIAL
from .vocab import SPECIAL_TOKEN_OFFSETS

PRESETS = ("tiny", "a3b")
# The processor's image token budget per variant (preprocessor_config.json in_token_limit).
IN_TOKEN_LIMIT = {"instruct": 4096, "thinking": 4096, "thinking-2506": 16384}

# a3b = the real dimensions (docs/model.md §2); tiny = every structural feature at a few MB: >= 3 vision layers,
# a pos-emb grid that real images resample, >= 2 MoE layers after one dense layer, 8 routed experts top-2, a shared
# expert, MLA without q LoRA, untied head. Text matrices have rows that are multiples of 256 so K-quants apply,
# while the expert down projection (128) and attn_k_b (32) fall back like the real 1408 and 128; the vision MLP
# width (304 = 9.5 x 32) forces vision ffn_down to F16 like the real 4304.

_A3B: dict[str, Any] = dict(
    vision=dict(patch_size=14, hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                intermediate_size=4304, init_pos_emb_height=64, init_pos_emb_width=64),
    text=dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
              num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
              num_experts_per_tok=6, routed_scaling_factor=2.446, kv_lora_rank=512, qk_nope_head_dim=128,
              qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=131072),
    base_vocab=163584,
)

_TINY: dict[str, Any] = dict(
    vision=dict(patch_size=14, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=304, init_pos_emb_height=16, init_pos_emb_width=16),
    text=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
              num_hidden_layers=3, num_attention_heads=8, n_shared_experts=1, n_routed_experts=8,
              num_experts_per_tok=2, routed_scaling_factor=2.446, kv_lora_rank=256, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=4096),
    base_vocab=768,
)

PRESET_DIMS: dict[str, dict[str, Any]] = {"a3b": _A3B, "tiny": _TINY}


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
    """The preset's config.json as the runtime reads it."""
    return KimiVLConfig.from_dict(preset_config_dict(preset, variant))


def scaled_config_dict(preset: str, variant: str, layers: int | None = None) -> dict:
    """The preset's config.json; with ``layers``, the text and vision towers are ``layers`` deep (a scaled-down
    model for benchmarks on small disks; every other dimension stays the preset's)."""
    cfg = preset_config_dict(preset, variant)
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise UsageError(f"layers must be a positive integer, got {layers!r}")
        cfg["text_config"]["num_hidden_layers"] = layers
        cfg["vision_config"]["num_hidden_layers"] = layers
    return cfg


def config_files(cfg: dict, variant: str) -> dict[str, dict]:
    """config.json, generation_config.json and preprocessor_config.json of a checkpoint with config.json ``cfg``,
    laid out as the real variant's files."""
    t = cfg["text_config"]
    gen = ({"eos_token_id": [t["eos_token_id"]]} if variant == "thinking-2506" else
           {"bos_token_id": t["bos_token_id"], "eos_token_id": t["eos_token_id"],
            "pad_token_id": t["pad_token_id"]})
    gen["transformers_version"] = cfg["transformers_version"]
    pre = {
        "auto_map": {"AutoImageProcessor": "image_processing_kimi_vl.KimiVLImageProcessor",
                     "AutoProcessor": "processing_kimi_vl.KimiVLProcessor"},
        "image_processor_type": "KimiVLImageProcessor",
        "processor_class": "KimiVLProcessor",
        "patch_size": cfg["vision_config"]["patch_size"],
        "merge_kernel_size": cfg["vision_config"]["merge_kernel_size"],
        "pad_input": True,
        "in_token_limit": IN_TOKEN_LIMIT[variant],
        "num_pooled_tokens": 1024,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    return {"config.json": cfg, "generation_config.json": gen, "preprocessor_config.json": pre}
