"""Our own GGUF metadata keys (``kimivl_edge.*``): one constant per key, for the writer (``convert``) and the
readers (``gguf_model``, ``mmproj``). llama.cpp ignores keys it does not know; its own keys are ``gguf.Keys``,
whose layout this class follows.
"""
from __future__ import annotations

__all__ = ["EdgeKeys"]


class EdgeKeys:
    PREFIX = "kimivl_edge."

    VARIANT = "kimivl_edge.variant"                        # instruct | thinking | thinking-2506
    VARIANT_SOURCE = "kimivl_edge.variant_source"          # what decided it: "--variant", or the checkpoint's files
    FILE_TYPE = "kimivl_edge.file_type"                    # our recipe name (Q4_K_EDGE has no llama_ftype of its own)
    MEDIA_PLACEHOLDER_TOKEN_ID = "kimivl_edge.media_placeholder_token_id"

    class Text:
        # HF normalises the MLA latent with its own epsilon; llama.cpp uses rms_norm_eps.
        KV_A_LAYERNORM_EPS = "kimivl_edge.text.kv_a_layernorm_epsilon"

    class Vision:
        IN_TOKEN_LIMIT = "kimivl_edge.vision.in_token_limit"  # preprocessing budget (preprocessor_config.json)
        PAD_INPUT = "kimivl_edge.vision.pad_input"
        POS_EMB_HEIGHT = "kimivl_edge.vision.pos_emb_height"  # the learned pos-emb grid
        POS_EMB_WIDTH = "kimivl_edge.vision.pos_emb_width"
        ROPE_LAYOUT = "kimivl_edge.vision.rope_layout"        # "ggml_split" when Q/K rows are permuted; absent: HF's

    class Projector:
        GELU = "kimivl_edge.projector.gelu"                   # "erf" (the HF model's)
