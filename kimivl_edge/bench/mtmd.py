"""llama.cpp's own multimodal CLI, ``llama-mtmd-cli``, as the bench runs it (facts from ``tools/mtmd/mtmd-cli.cpp``,
``tools/mtmd/clip.cpp`` and ``common/log.cpp`` of the llama.cpp that llama-cpp-python vendors; the tool is built by
``llama_tools``): its command line, what it writes to stdout before the answer, and the figures its log reports.

- stdout: with ``-p`` and ``--image`` it runs one turn. Its log lines go to stderr; the answer goes to stdout, one
  piece per generated token, each flushed (``LOG`` at level NONE, printed and flushed by the log's worker thread).
  Before the first piece it writes exactly one newline, when the prompt has been evaluated (``eval_message``).
- the image encode: ``mtmd batch encoding done in N ms`` (``eval_message``, around ``mtmd_batch_encode``).
- the vision graph's attention: ``warmup: flash attention is enabled|disabled`` (clip.cpp, at load: ``auto``, its
  default, tries flash attention and keeps it where the CPU backend supports it). The libraries log at "trace"
  level (``common_log_get_verbosity``), above the default threshold: only with ``-lv 4``.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import KimiVLError

TOOL = "llama-mtmd-cli"
PREAMBLE = b"\n"  # written once the prompt is evaluated, before the first generated piece
_ENCODE = re.compile(r"mtmd batch encoding done in (\d+) ms")
_FLASH = re.compile(r"flash attention is (enabled|disabled)")


def command(tool: Path, text: Path, mmproj: Path, image: Path, prompt: str, threads: int, n_predict: int,
            n_ctx: int, repack: bool, library_log: bool = False) -> list[str]:
    """One greedy turn: ``-p`` holds no media marker, so the tool puts the image first (where the model's chats
    have it). ``repack=False`` passes ``--no-repack`` (llama.cpp's extra weight buffers off, as ``kimivl-edge`` runs
    on a CPU where they abort on deepseek2, ``decoder.extra_buffers_safe``); every other setting is the tool's own
    default (load mode ``auto`` = mmap, flash attention ``auto``, warm-up on, ``--jinja`` on). ``library_log``:
    ``-lv 4``, so that the libraries' own info lines (the vision graph's flash attention) reach the log."""
    cmd = [str(tool), "-m", str(text), "--mmproj", str(mmproj), "--image", str(image), "-p", prompt,
           "-n", str(n_predict), "-t", str(threads), "-c", str(n_ctx), "--temp", "0", "--seed", "0"]
    return cmd + ([] if repack else ["--no-repack"]) + (["-lv", "4"] if library_log else [])


def encode_ms(log: str) -> list[int]:
    """Every image-batch encode time the tool logged, in ms; a clear error when its log has none."""
    found = [int(m) for m in _ENCODE.findall(log)]
    if not found:
        tail = " | ".join(log.strip().splitlines()[-3:])[-300:]
        raise KimiVLError(f"{TOOL} logged no 'mtmd batch encoding done in N ms' line (did it fail or change its log "
                          f"format?); its log ends: {tail or '(empty)'}")
    return found


def flash_attention(log: str) -> bool | None:
    """Whether the tool's vision graph runs flash attention (its warm-up's report), None if it did not say."""
    m = _FLASH.findall(log)
    return None if not m else m[-1] == "enabled"
