"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations

import json
import math
from pathlib import Path


class KimiVLError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug)."""


class CheckpointError(KimiVLError):
    """A checkpoint directory is missing files or its files disagree with each other."""


class UsageError(KimiVLError):
    """Bad command-line or API arguments."""


class GGUFFileError(KimiVLError):
    """A GGUF file that cannot be read, or is not the file it claims to be (text GGUF or mmproj)."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message folded to one line (for errors that wrap a library's message)."""
    s = " ".join(str(e).split())
    return s[:limit] or type(e).__name__


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """An integer option in [lo, hi] (bool is not an integer here), else a one-line UsageError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi):
        return value
    where = f">= {lo}" if hi is None else f"in {lo}..{hi}"
    raise UsageError(f"{name} must be an integer {where}, got {value!r}")


def check_float(name: str, value: object, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with ``lo_open``): NaN and infinities are refused."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        v = float(value)
        if (v > lo if lo_open else v >= lo) and (hi is None or v <= hi):
            return v
    low = f"({lo}" if lo_open else f"[{lo}"
    where = (f"> {lo}" if lo_open else f">= {lo}") if hi is None else f"in {low}, {hi}]"
    raise UsageError(f"{name} must be a finite number {where}, got {value!r}")


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file that must hold an object; every failure is a one-line ``CheckpointError``. Python's
    json extensions are refused: NaN, Infinity and numbers that overflow to infinity are not JSON and no Kimi-VL
    setting can be one."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_not_json, parse_float=_finite)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ours; nesting too deep
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def _not_json(word: str) -> float:
    raise ValueError(f"{word} is not a JSON number")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:40]} overflows to infinity")
    return v


class ImageError(KimiVLError):
    """An image cannot be used (unreadable, or too large for the position tables)."""
