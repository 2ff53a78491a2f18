"""`kimivl-edge synth`: a synthetic Kimi-VL checkpoint in exactly the Hugging Face layout.

The directory looks like a download of ``moonshotai/Kimi-VL-A3B-*``: config.json with every key, bf16 safetensors
shards + index (real tensor names, including the ``rotary_emb.inv_freq`` buffers), tiktoken.model, tokenizer_config.json
with the special tokens right after the base vocabulary, chat_template.jinja, preprocessor_config.json,
generation_config.json, and remote-code file names whose contents refuse to run (nothing may import them).

Weights are random with realistic scales, generated tensor by tensor in chunks and streamed to disk, so the a3b preset
(16.4 B parameters, ~33 GB) never sits in RAM. The output is written to a temporary sibling directory and renamed into
place at the end: an interrupted run leaves nothing behind.

    kimivl-edge synth OUTDIR [--preset tiny|a3b] [--variant instruct|thinking|thinking-2506] [--seed N] [--force]

Everything only synthetic checkpoints need lives in this package: ``presets`` (dimensions, small json files),
``vocab`` (BPE trainer, corpus, tokenizer file writers), ``template`` (the chat template they ship), ``weights``
(random / given tensors, shards) and ``writer`` (one whole directory). The runtime never imports it.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..checkpoint import hf_tensor_specs
from ..config import VARIANTS, KimiVLConfig
from ..convert.outdir import format_size
from ..errors import UsageError
from .presets import PRESET_DIMS, PRESETS, config_files, preset_config, preset_config_dict, scaled_config_dict
from .template import KIMI_VL_CHAT_TEMPLATE
from .vocab import (SPECIAL_TOKEN_OFFSETS, PreTokenizer, build_vocab, corpus, extend_vocab, special_token_names,
                    train_bpe, write_tiktoken_model, write_tokenizer_config)
from .weights import plan_shards, tensor_chunks, weight_chunks, weight_scale
from .writer import write_checkpoint

__all__ = [
    "synth", "main", "write_checkpoint",
    "PRESETS", "PRESET_DIMS", "preset_config", "preset_config_dict", "scaled_config_dict", "config_files",
    "KIMI_VL_CHAT_TEMPLATE",
    "SPECIAL_TOKEN_OFFSETS", "PreTokenizer", "build_vocab", "corpus", "extend_vocab", "special_token_names",
    "train_bpe", "write_tiktoken_model", "write_tokenizer_config",
    "plan_shards", "tensor_chunks", "weight_chunks", "weight_scale",
]


def synth(outdir: str | Path, preset: str = "tiny", variant: str = "instruct", seed: int = 0,
          force: bool = False, progress: bool = False, weights: Mapping[str, np.ndarray] | None = None,
          layers: int | None = None) -> Path:
    """Create a synthetic checkpoint at ``outdir`` atomically (temporary sibling directory, then rename); with
    ``weights`` its tensors are those values (bf16) instead of random ones. ``layers`` scales the text and vision
    depth down (random weights of the kept layers are those of the full-depth checkpoint: per seed and name)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} exists and is not empty (use --force to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"parent directory {parent} does not exist")
    need = sum(2 * int(np.prod(s.shape)) for s in hf_tensor_specs(KimiVLConfig.from_dict(
        scaled_config_dict(preset, variant, layers))))
    tmp = parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()  # first: a read-only location is refused as such, not as "no space" (it may report 0 free)
        try:
            free = shutil.disk_usage(parent).free
            if need > free:
                raise UsageError(f"not enough disk space in {parent}: need {format_size(need)}, "
                                 f"{format_size(free)} free")
            write_checkpoint(tmp, preset, variant, seed, progress=progress, weights=weights, layers=layers)
            if out.is_dir():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:  # read-only, full, no permission: the output location, never a bug
        raise UsageError(f"cannot write the checkpoint to {out}: {e.strerror or e}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    from ..cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge synth", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("outdir", help="directory to create (must not exist or be empty, unless --force)")
    ap.add_argument("--preset", default="tiny", help="tiny (a few MB) or a3b (the real dimensions, ~33 GB)")
    ap.add_argument("--variant", default="instruct", help="instruct, thinking or thinking-2506")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    args = ap.parse_args(argv)
    out = synth(args.outdir, args.preset, args.variant, args.seed, args.force, progress=args.preset == "a3b")
    print(f"wrote {args.preset} {args.variant} checkpoint to {out}")
    return 0
