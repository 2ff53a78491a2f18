"""HF Kimi-VL checkpoint -> text GGUF (deepseek2) + mmproj GGUF (clip/kimivl), quantized, streamed, atomic.

    from kimivl_edge.convert import convert_checkpoint
    text_path, mmproj_path = convert_checkpoint("path/or/moonshotai/Kimi-VL-A3B-Instruct", outtype="q4_k_m")

The checkpoint's files are read as data; no code from the checkpoint is imported. Every file is written in one pass
over the checkpoint: row blocks are widened, encoded on every core by ggml's own quantizer (``quant.kernels``; the
K-quant mixes Q4_K_M / Q5_K_M / Q6_K get exactly the per-tensor types and bytes of llama.cpp's
``llama_model_quantize``, without its intermediate file) and written in order.

Modules: ``pipeline`` (checkpoint -> plan -> written files), ``variant`` (which variant, from the checkpoint's own
files), ``text`` / ``mmproj`` / ``tokenizer`` (each file's tensors and metadata), ``gguf_out`` (the streamed atomic
writer and its report), ``outdir`` (where the files go: default, checks, disk errors, stale partials), ``cli`` (the
verb).
"""
from .gguf_out import GGUFPlan, PlannedTensor, WriteReport, WrittenTensor, write_gguf
from .pipeline import (
    MMPROJ_TYPES,
    TEMPERATURE,
    TEXT_TYPES,
    ConvertPlan,
    ConvertResult,
    check_outdir,
    convert_checkpoint,
    format_plan,
    format_result,
    plan_conversion,
    resolve_checkpoint,
)
from .variant import detect_variant, model_name

__all__ = [
    "GGUFPlan", "PlannedTensor", "WriteReport", "WrittenTensor", "write_gguf",
    "MMPROJ_TYPES", "TEMPERATURE", "TEXT_TYPES", "ConvertPlan", "ConvertResult", "check_outdir", "convert_checkpoint",
    "detect_variant", "format_plan", "format_result", "model_name", "plan_conversion", "resolve_checkpoint",
]
