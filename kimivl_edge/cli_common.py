"""What the model verbs (`run`, `chat`) share: their model and sampling options, loading, and streaming a turn.

A verb module imports this, never another verb.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from .model import KimiVL, Piece, Stats
    from .sampling import SamplingSettings

MMAP_CHOICES = {"auto": None, "on": True, "off": False}
MAX_THREADS = 512            # GGML_MAX_N_THREADS (ggml.h)
PREFILL_PROGRESS_MIN = 256   # prompts with fewer positions to evaluate show no prefill progress


def number(kind: type, lo: float, hi: float | None = None, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (int or float) in [lo, hi] (``above``: lo excluded; no ``hi``: no
    upper bound), else a one-line argparse error that names the option and the rule."""
    name = "an integer" if kind is int else "a number"
    if hi is None:
        rule = f"{name} {'>' if above else '>='} {lo}"
    elif kind is int:
        rule = f"{name} in {lo}..{hi}"
    else:
        rule = f"{name} in {'(' if above else '['}{lo}, {hi}]"

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not (math.isfinite(v) and (v > lo if above else v >= lo) and (hi is None or v <= hi)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v

    return parse


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", required=True, help="text GGUF (deepseek2) written by kimivl-edge convert")
    ap.add_argument("--mmproj", help="vision GGUF (mmproj-*.gguf); needed for images")
    ap.add_argument("--threads", type=number(int, 1, MAX_THREADS), help="CPU threads (default: all cores)")
    ap.add_argument("--ctx", type=number(int, 16, 131072), default=4096,
                    help="context size in tokens (default 4096, 16..131072)")
    ap.add_argument("--kv-type", default="f16", choices=("f16", "f32", "q8_0", "bf16"), help="KV cache type")
    ap.add_argument("--vision-backend", default="numpy", choices=("numpy", "ggml"),
                    help="numpy (exact, default) or ggml (llama.cpp's clip; see README for its deviations)")
    ap.add_argument("--max-image-patches", type=number(int, 4),
                    help="cap patches per image (speed knob; 4 patches = 1 token)")
    ap.add_argument("--weight-cache", action="store_true", help="keep dequantized vision weights in RAM (faster)")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (faster on long contexts, "
                    "rounds through F16)")
    ap.add_argument("--mmap", default="auto", choices=tuple(MMAP_CHOICES),
                    help="memory-map the text GGUF: auto (default) maps it unless llama.cpp repacks weights (Q4_K, "
                    "Q4_0, IQ4_NL on x86), which would keep the file and the repacked copy in RAM")
    ap.add_argument("--no-repack", action="store_true", help="use weights in their file layout, no repacked copies "
                    "(with --mmap auto the file is then mapped: fastest load, same memory)")
    ap.add_argument("--no-exif", action="store_true", help="use an image's stored pixels as they are; by default "
                    "its EXIF orientation is applied, as transformers' load_image does")
    ap.add_argument("--cache-dir", help="prefix cache directory: the state after a prompt's images, reused by later "
                    "prompts and processes (default $XDG_CACHE_HOME/kimivl-edge, else ~/.cache/kimivl-edge)")
    ap.add_argument("--cache-max-mb", type=number(int, 0), default=2048, help="prefix cache size bound in MiB, "
                    "least recently used entries go first (default 2048)")
    ap.add_argument("--no-cache", action="store_true", help="no prefix cache: read and write nothing on disk")


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--temp", type=number(float, 0), help="temperature (default: the model's, Instruct 0.2 / "
                    "Thinking 0.8; 0 = greedy)")
    ap.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0)
    ap.add_argument("--top-k", type=number(int, 0), default=0)
    ap.add_argument("--min-p", type=number(float, 0, 1), default=0.0)
    ap.add_argument("--repeat-penalty", type=number(float, 0, above=True), default=1.0)
    ap.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    ap.add_argument("--max-tokens", type=number(int, 1), default=512, help="tokens per answer (default 512)")


def load_model(args: argparse.Namespace) -> KimiVL:
    """The pair the options name; on a terminal, progress of the load, of image encodes and of long prefills."""
    from .model import KimiVL
    from .prefix_cache import PrefixCache

    tty = sys.stderr.isatty()
    cache = None if args.no_cache else PrefixCache(args.cache_dir, args.cache_max_mb << 20)
    model = KimiVL.load(args.model, args.mmproj, n_ctx=args.ctx, n_threads=args.threads, kv_type=args.kv_type,
                        vision_backend=args.vision_backend, weight_cache=args.weight_cache,
                        flash_attn=args.flash_attn, max_image_patches=args.max_image_patches,
                        mmap=MMAP_CHOICES[args.mmap], repack=not args.no_repack, exif_transpose=not args.no_exif,
                        load_progress=load_progress if tty else None, prefix_cache=cache)
    note = image_budget_note(model)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if tty:
        model.encode_progress = encode_progress
        model.prefill_progress = prefill_progress
    return model


def image_budget_note(model: KimiVL) -> str | None:
    """When one image at the model's patch budget can take more tokens than the context holds (Thinking-2506:
    16384 patches = 4096 tokens, against the default --ctx 4096), say so at load, naming what to change."""
    cfg = model.image_config
    if cfg is None:
        return None
    from .image import effective_token_limit

    area = cfg.merge_kernel_size[0] * cfg.merge_kernel_size[1]
    patches = effective_token_limit(cfg, model.max_image_patches)
    n_ctx = model.decoder.n_ctx
    if patches // area <= n_ctx // 2:
        return None
    return (f"one image may take up to {patches // area} image tokens ({patches} patches) of the {n_ctx}-token "
            f"context; raise --ctx or set --max-image-patches {n_ctx // 2 * area} (half the context per image)")


def _progress_line(text: str, done: int, total: int) -> None:
    """One self-overwriting line on stderr, erased when ``done`` reaches ``total``."""
    sys.stderr.write(f"\r{text}" + ("\r\033[K" if done >= total else ""))
    sys.stderr.flush()


def load_progress(done: int, total: int, unit: str) -> None:
    """Progress of llama.cpp's model load (percent)."""
    _progress_line(f"loading model: {done}{unit}", done, total)


def encode_progress(done: int, total: int, unit: str) -> None:
    """Progress of a long image encode (``vision.Progress``: "layer i/n" from the numpy backend, "image i/n" from
    llama.cpp's clip)."""
    _progress_line(f"encoding images: {unit} {done}/{total}", done, total)


def prefill_progress(done: int, total: int, unit: str) -> None:
    """Progress of a prefill of at least PREFILL_PROGRESS_MIN positions (shorter ones are quick)."""
    if total >= PREFILL_PROGRESS_MIN:
        _progress_line(f"reading the prompt: {done}/{total} {unit}s", done, total)


def sampling(args: argparse.Namespace) -> SamplingSettings:
    from .sampling import SamplingSettings

    return SamplingSettings(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repeat_penalty=args.repeat_penalty, seed=args.seed, max_tokens=args.max_tokens).validate()


class Turn(Protocol):
    """What ``print_stream`` reads: pieces, then the turn's figures (``model.PieceStream`` is one)."""

    @property
    def stats(self) -> Stats: ...

    def __iter__(self) -> Iterator[Piece]: ...


def print_stream(stream: Turn, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> str:
    """Write a turn as it streams and return its answer. The answer goes to ``out``. A thinking model's reasoning
    goes to ``err`` after a "Thinking:" line, and "Answer:" follows it there, so a terminal shows the two apart
    while piped stdout holds the answer alone. A turn stopped by the token limit (``--max-tokens`` or a full
    context) says so on ``err``, and whether that cut the reasoning, leaving no answer."""
    answer: list[str] = []
    section = ""
    for piece in stream:
        if piece.kind == "reasoning":
            if not section:
                err.write("Thinking:\n")
            section = "reasoning"
            err.write(piece.text)
            err.flush()
            continue
        if section == "reasoning":
            err.write("\nAnswer:\n")
            err.flush()
        section = "answer"
        answer.append(piece.text)
        out.write(piece.text)
        out.flush()
    out.write("\n")
    out.flush()
    if section == "reasoning":
        err.write("\n")
    if stream.stats.finish_reason == "length":
        where = "inside the reasoning: no answer" if section == "reasoning" else "the answer is cut"
        err.write(f"(stopped at the token limit, --max-tokens or the context: {where})\n")
    err.flush()
    return "".join(answer)
