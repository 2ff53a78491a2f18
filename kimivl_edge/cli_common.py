"""What the model verbs (`run`, `chat`) share: their model and sampling options, loading, and streaming a turn.

A verb module imports this, never another verb.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

from .errors import check_int

if TYPE_CHECKING:
    from .model import KimiVL, Stats
    from .sampling import SamplingSettings

MMAP_CHOICES = {"auto": None, "on": True, "off": False}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", required=True, help="text GGUF (deepseek2) written by kimivl-edge convert")
    ap.add_argument("--mmproj", help="vision GGUF (mmproj-*.gguf); needed for images")
    ap.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    ap.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default 4096, up to 131072)")
    ap.add_argument("--kv-type", default="f16", choices=("f16", "f32", "q8_0", "bf16"), help="KV cache type")
    ap.add_argument("--vision-backend", default="numpy", choices=("numpy", "ggml"),
                    help="numpy (exact, default) or ggml (llama.cpp's clip; see README for its deviations)")
    ap.add_argument("--max-image-patches", type=int, help="cap patches per image (speed knob; 4 patches = 1 token)")
    ap.add_argument("--weight-cache", action="store_true", help="keep dequantized vision weights in RAM (faster)")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (faster on long contexts, "
                    "rounds through F16)")
    ap.add_argument("--mmap", default="auto", choices=tuple(MMAP_CHOICES),
                    help="memory-map the text GGUF: auto (default) maps it unless llama.cpp repacks weights (Q4_K, "
                    "Q4_0, IQ4_NL on x86), which would keep the file and the repacked copy in RAM")
    ap.add_argument("--no-repack", action="store_true", help="use weights in their file layout, no repacked copies "
                    "(with --mmap auto the file is then mapped: fastest load, same memory)")
    ap.add_argument("--cache-dir", help="prefix cache directory: the state after a prompt's images, reused by later "
                    "prompts and processes (default $XDG_CACHE_HOME/kimivl-edge, else ~/.cache/kimivl-edge)")
    ap.add_argument("--cache-max-mb", type=int, default=2048, help="prefix cache size bound in MiB, least recently "
                    "used entries go first (default 2048)")
    ap.add_argument("--no-cache", action="store_true", help="no prefix cache: read and write nothing on disk")


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--temp", type=float, help="temperature (default: the model's, Instruct 0.2 / Thinking 0.8)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--repeat-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=512)


def load_model(args: argparse.Namespace) -> KimiVL:
    from .model import KimiVL
    from .prefix_cache import PrefixCache

    max_bytes = check_int("--cache-max-mb", args.cache_max_mb, 0) << 20
    cache = None if args.no_cache else PrefixCache(args.cache_dir, max_bytes)
    model = KimiVL.load(args.model, args.mmproj, n_ctx=args.ctx, n_threads=args.threads, kv_type=args.kv_type,
                        vision_backend=args.vision_backend, weight_cache=args.weight_cache,
                        flash_attn=args.flash_attn, max_image_patches=args.max_image_patches,
                        mmap=MMAP_CHOICES[args.mmap], repack=not args.no_repack, prefix_cache=cache)
    if sys.stderr.isatty():
        model.encode_progress = encode_progress
    return model


def encode_progress(done: int, total: int, unit: str) -> None:
    """Progress of a long image encode (``vision.Progress``: "layer i/n" from the numpy backend, "image i/n" from
    llama.cpp's clip), on the terminal only."""
    sys.stderr.write(f"\rencoding images: {unit} {done}/{total}" + ("\r\033[K" if done == total else ""))
    sys.stderr.flush()


def sampling(args: argparse.Namespace) -> SamplingSettings:
    from .sampling import SamplingSettings

    return SamplingSettings(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repeat_penalty=args.repeat_penalty, seed=args.seed, max_tokens=args.max_tokens).validate()


def print_stream(model: KimiVL, messages: list[dict], settings: SamplingSettings, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> tuple[str, Stats]:
    """Stream a turn: reasoning to ``err``, answer to ``out``. Returns the answer and the turn's figures."""
    stream = model.stream(messages, settings)
    answer: list[str] = []
    reasoning: list[str] = []
    for piece in stream:
        if piece.kind == "reasoning":
            reasoning.append(piece.text)
            err.write(piece.text)
            err.flush()
        else:
            if reasoning and not answer:
                err.write("\n")
            answer.append(piece.text)
            out.write(piece.text)
            out.flush()
    out.write("\n")
    out.flush()
    return "".join(answer), stream.stats
