"""Which Kimi-VL-A3B variant a checkpoint is (Instruct, Thinking, Thinking-2506), from its own files.

The three checkpoints share tensors and config (docs/model.md §1); the variant decides the GGUF's name, its
recommended temperature and whether outputs are split into reasoning and answer. ``--variant`` wins. Otherwise the
files are asked in this order of trust, each narrowing the candidates; the first that leaves one decides:

1. the chat template (``chat_template.jinja`` or tokenizer_config.json's): a template that handles the Thinking
   markers ``◁think▷`` / ``◁/think▷`` (docs/model.md §7.4) is a Thinking one (either of the two);
2. ``generation_config.json`` ``temperature``: the model cards' 0.2 is Instruct's, 0.8 the Thinking variants',
   0.6 the April 2025 Thinking card's (docs/model.md §1);
3. ``config.json`` ``_name_or_path`` (or ``name_or_path``) naming ``Kimi-VL-A3B-<Variant>``;
4. the README model card: the ``"moonshotai/Kimi-VL-A3B-<Variant>"`` string its code example loads, else its title;
5. the directory name (or the HF cache folder ``models--moonshotai--Kimi-VL-A3B-<Variant>``).

A source that contradicts a more trusted one is ignored, and reported. When no source leaves a single variant,
conversion is refused with a one-line error asking for ``--variant``: a Thinking model converted as Instruct
silently gets the wrong name, temperature and no reasoning split.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from ..config import TEMPERATURE, VARIANTS
from ..errors import CheckpointError, UsageError
from ..prompt import load_chat_template

__all__ = ["detect_variant", "model_name", "variant_of_name"]

THINKING = frozenset({"thinking", "thinking-2506"})
THINK_MARKERS = ("◁think▷", "◁/think▷")
OLD_THINKING_TEMPERATURE = 0.6  # the April 2025 Thinking model card's (docs/model.md §1)
_NAME = re.compile(r"kimi-vl-a3b-(instruct|thinking(?:[-_]2506)?)(?![0-9])", re.IGNORECASE)
_QUOTED_REPO = re.compile(r"[\"']moonshotai/(kimi-vl-a3b-[\w-]+)[\"']", re.IGNORECASE)

Claim = tuple[frozenset[str], str]  # (the variants a source allows, what it says)


def model_name(variant: str) -> str:
    return "Kimi-VL-A3B-" + {"instruct": "Instruct", "thinking": "Thinking", "thinking-2506": "Thinking-2506"}[variant]


def variant_of_name(text: str) -> set[str]:
    """The variants named in ``text`` as ``Kimi-VL-A3B-<Variant>`` (case-insensitive)."""
    return {m.lower().replace("_", "-") for m in _NAME.findall(text)}


def _one(found: set[str], what: str) -> Claim | None:
    return (frozenset(found), f"{what} names {model_name(next(iter(found)))}") if len(found) == 1 else None


def _from_template(path: Path) -> Claim | None:
    try:
        template = load_chat_template(path)
    except CheckpointError:
        return None
    if any(m in template for m in THINK_MARKERS):
        return THINKING, "chat template handles ◁think▷ (a Thinking variant)"
    return None


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _from_generation_config(path: Path) -> Claim | None:
    t = _json(path / "generation_config.json").get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return None
    allowed = {v for v, vt in TEMPERATURE.items() if math.isclose(t, vt)}
    if math.isclose(t, OLD_THINKING_TEMPERATURE):
        allowed.add("thinking")
    return (frozenset(allowed), f"generation_config.json temperature {t:g}") if allowed else None


def _from_name_or_path(path: Path) -> Claim | None:
    cfg = _json(path / "config.json")
    for key in ("_name_or_path", "name_or_path"):
        value = cfg.get(key)
        if isinstance(value, str):
            claim = _one(variant_of_name(value), f"config.json {key}")
            if claim:
                return claim
    return None


def _from_readme(path: Path) -> Claim | None:
    try:
        text = (path / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    repos = set().union(*(variant_of_name(r) for r in _QUOTED_REPO.findall(text)))
    claim = _one(repos, "README.md's code example")
    if claim:
        return claim
    title = next((line for line in text.splitlines() if line.startswith("# ")), "")
    return _one(variant_of_name(title), "README.md title")


def _from_directory(path: Path) -> Claim | None:
    parts = path.resolve().parts
    for part in reversed(parts[-3:]):  # the directory, or an HF cache snapshot's models--owner--name folder
        claim = _one(variant_of_name(part), f"directory name {part!r}")
        if claim:
            return claim
    return None


SOURCES: tuple[Callable[[Path], Claim | None], ...] = (
    _from_template, _from_generation_config, _from_name_or_path, _from_readme, _from_directory)


def detect_variant(path: Path, given: str | None) -> tuple[str, str]:
    """(variant, which source decided it): ``given`` (--variant), else the checkpoint's files (module docstring).
    Raises a one-line ``UsageError`` when they do not leave exactly one variant."""
    if given:
        if given not in VARIANTS:
            raise UsageError(f"unknown variant {given!r} (choose from {', '.join(VARIANTS)})")
        return given, "--variant"
    candidates, said, ignored = frozenset(VARIANTS), [], []
    for source in SOURCES:  # every source is asked, so that a contradiction is reported, not hidden
        claim = source(path)
        if claim is None:
            continue
        allowed, what = claim
        if not candidates & allowed:
            ignored.append(f"ignored: {what}")
        elif len(candidates) > 1:
            candidates = candidates & allowed
            said.append(what)
    how = "; ".join(said + ignored)
    if len(candidates) == 1:
        return next(iter(candidates)), how
    raise UsageError(f"{path}: cannot tell which variant this checkpoint is ({how or 'no file names it'}); pass "
                     f"--variant {'|'.join(v for v in VARIANTS if v in candidates)}")
