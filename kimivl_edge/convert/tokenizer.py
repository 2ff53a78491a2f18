"""Tokenizer metadata of the text GGUF: every ``tokenizer.ggml.*`` key plus ``tokenizer.chat_template``.

Built from the checkpoint's files, read as data (docs/model.md §7, §8, §13.3–13.5): ``tiktoken.model`` (BPE ranks),
``tokenizer_config.json`` (special-token names and ids), ``config.json`` (vocab_size, special ids, media
placeholder), ``generation_config.json`` (stop ids) and the chat template. No checkpoint code is ever imported.

The layout is the one llama.cpp loads for this tokenizer family (§8, §11 metadata): model ``gpt2``, pre-tokenizer
``kimi-k2``; base tokens written as their bytes in the GPT-2 byte-to-unicode alphabet, special tokens by name,
unused ids ``[PAD{i}]``; merges rebuilt from the ranks (a token whose lower-rank BPE gives exactly two parts yields
the merge "a b", in rank order).

End of generation (§7.3: stop on ``[EOS]`` and ``<|im_end|>``). In the llama.cpp vendored by llama-cpp-python
0.3.36 (``src/llama-vocab.cpp``), the EOG set is the union of (1) the tokens whose *text* is in a fixed list
(it contains ``[EOS]``, ``[EOT]`` and ``<|im_end|>``), (2) the FIM pad/rep/sep ids (``[PAD]`` is auto-detected as
FIM pad, so it is EOG too), and (3) the ids written under ``tokenizer.ggml.eos_token_id``, ``eot_token_id`` and
``eom_token_id``. The text list alone would cover the real names, but it depends on them; writing
``eos_token_id`` = ``[EOS]`` and ``eot_token_id`` = ``<|im_end|>`` makes both EOG whatever they are called, and
also pins EOT (llama.cpp's text detection would otherwise pick ``<|im_end|>`` or ``[EOT]`` in hash-map order). One
further stop id listed by ``generation_config.json`` goes to ``eom_token_id``; more cannot be expressed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, Keys, TokenType

from ..config import KimiVLConfig
from ..errors import CheckpointError, read_json_object
from ..prompt import load_chat_template
from ..tokenizer import (BYTE_ALPHABET, bpe_parts, encode_byte_alphabet, generation_stop_ids, read_special_tokens,
                         read_tiktoken_model)

TOKENIZER_MODEL = "gpt2"
TOKENIZER_PRE = "kimi-k2"
PAD_NAME = "[PAD{}]"  # name of an id that neither the ranks nor the special tokens cover (§8)

KV = dict[str, tuple[Any, GGUFValueType | None]]


# ---------------------------------------------------------------------------------------------------------------
# Merges

def rebuild_merges(ranks: Mapping[bytes, int]) -> tuple[list[str], list[int]]:
    """llama.cpp merges from tiktoken ranks (§8): for each multi-byte token in rank order, its lower-rank BPE; exactly
    two parts (a, b) give the merge "text(a) text(b)". Returns (merges, ranks of tokens that yield no merge: llama.cpp
    can never produce those)."""
    merges: list[str] = []
    unreachable: list[int] = []
    for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        if len(token) == 2:  # no lower-rank merge can apply inside two bytes
            merges.append(f"{BYTE_ALPHABET[token[0]]} {BYTE_ALPHABET[token[1]]}")
            continue
        parts = bpe_parts(ranks, token, r)
        if len(parts) == 2:
            merges.append(f"{encode_byte_alphabet(parts[0])} {encode_byte_alphabet(parts[1])}")
        else:
            unreachable.append(r)
    return merges, unreachable


# ---------------------------------------------------------------------------------------------------------------
# Token list

def gguf_vocab_tokens(ranks: Mapping[bytes, int], specials: Mapping[str, int],
                      vocab_size: int) -> tuple[list[str], list[int]]:
    """(token texts, token types) for ids 0..vocab_size-1 (§8): base ranks in the GPT-2 alphabet (NORMAL), special
    tokens by name (CONTROL), any other id ``[PAD{i}]`` (UNUSED). Raises CheckpointError if an id falls outside
    vocab_size or two ids would carry the same text (llama.cpp maps text -> id)."""
    n_base = len(ranks)
    top = max([n_base - 1, *specials.values()])
    if top >= vocab_size:
        raise CheckpointError(f"config.json vocab_size {vocab_size} is smaller than the tokenizer's "
                              f"{n_base} base + special ids (highest id {top})")
    texts: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, r in ranks.items():
        texts[r] = encode_byte_alphabet(token)
    types[:n_base] = [int(TokenType.NORMAL)] * n_base
    for name, tid in specials.items():
        if texts[tid] is not None:
            raise CheckpointError(f"special token {name!r} id {tid} collides with a base rank")
        texts[tid] = name
        types[tid] = int(TokenType.CONTROL)
    out = [t if t is not None else PAD_NAME.format(i) for i, t in enumerate(texts)]
    _check_unique(out)
    return out, types


def _check_unique(texts: Sequence[str]) -> None:
    if len(set(texts)) == len(texts):
        return
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        if t in seen:
            raise CheckpointError(f"token text {t!r} appears twice in the vocabulary (ids {seen[t]} and {i})")
        seen[t] = i


# ---------------------------------------------------------------------------------------------------------------
# Special ids

def _named_id(tok_cfg: dict, key: str, specials: Mapping[str, int]) -> int | None:
    """Id of tokenizer_config.json ``key`` ("bos_token", ...), a name or {"content": name} (§7.2); None if absent."""
    entry = tok_cfg.get(key)
    if isinstance(entry, dict):
        entry = entry.get("content")
    if entry is None:
        return None
    if not isinstance(entry, str) or entry not in specials:
        raise CheckpointError(f"tokenizer_config.json: {key} {entry!r} is not a special token of "
                              f"added_tokens_decoder")
    return specials[entry]


def _required_id(tok_cfg: dict, key: str, specials: Mapping[str, int]) -> int:
    tid = _named_id(tok_cfg, key, specials)
    if tid is None:
        raise CheckpointError(f"tokenizer_config.json: no {key}")
    return tid


def _check_config_ids(cfg: KimiVLConfig, ids: Mapping[str, int | None], specials: Mapping[str, int]) -> None:
    """config.json must agree with tokenizer_config.json on the ids the model was trained with (§7.2, §10.4)."""
    pairs = (("bos_token_id", cfg.text.bos_token_id, "bos"), ("eos_token_id", cfg.text.eos_token_id, "eos"),
             ("pad_token_id", cfg.text.pad_token_id, "pad"))
    for field, value, kind in pairs:
        if ids.get(kind) is not None and value != ids[kind]:
            raise CheckpointError(f"config.json text_config {field} {value} != {kind}_token id {ids[kind]} in "
                                  f"tokenizer_config.json (renumbered specials?)")
    media = specials["<|media_pad|>"]
    if cfg.media_placeholder_token_id != media:
        raise CheckpointError(f"config.json media_placeholder_token_id {cfg.media_placeholder_token_id} != "
                              f"<|media_pad|> id {media} in tokenizer_config.json (renumbered specials?)")


def stop_token_ids(ckpt_dir: str | Path, specials: Mapping[str, int], eos_id: int) -> tuple[int, int, int | None]:
    """(eos, eot, eom) for llama.cpp (§7.3): eos = tokenizer_config eos_token, eot = <|im_end|>, eom = the one stop id
    generation_config.json adds beyond those, or None."""
    eot = specials["<|im_end|>"]
    extra = [i for i in dict.fromkeys(generation_stop_ids(ckpt_dir)) if i not in (eos_id, eot)]
    if len(extra) > 1:
        raise CheckpointError(f"generation_config.json lists stop ids {extra} besides [EOS]/<|im_end|>; llama.cpp "
                              f"metadata can mark only one more (eom_token_id)")
    names = {v: k for k, v in specials.items()}
    if extra and extra[0] not in names:
        raise CheckpointError(f"generation_config.json stop id {extra[0]} is not a special token")
    return eos_id, eot, (extra[0] if extra else None)


# ---------------------------------------------------------------------------------------------------------------
# Public entry point

def vocab_metadata(ckpt_dir: str | Path) -> KV:
    """Every ``tokenizer.ggml.*`` key (and ``tokenizer.chat_template``) of the text GGUF, as key -> (value, type).

    Lists carry type None (the writer infers the element type: str, or INT32 for token types). Raises
    CheckpointError, one line, on inconsistent files: media placeholder not naming <|media_pad|>, config ids not
    naming the tokenizer_config tokens, vocab_size below base + specials, duplicate token texts, a missing byte."""
    d = Path(ckpt_dir)
    cfg = KimiVLConfig.from_checkpoint(d)
    ranks = read_tiktoken_model(d / "tiktoken.model")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{d / 'tiktoken.model'}: single-byte tokens missing ({len(missing)}, first "
                              f"0x{missing[0]:02x}); byte-level BPE needs all 256")
    specials = read_special_tokens(d / "tokenizer_config.json", len(ranks))
    tok_cfg = read_json_object(d / "tokenizer_config.json")
    eos_id = _required_id(tok_cfg, "eos_token", specials)
    ids = {
        "bos": _required_id(tok_cfg, "bos_token", specials),
        "eos": eos_id,
        "pad": _named_id(tok_cfg, "pad_token", specials),
        "unk": _named_id(tok_cfg, "unk_token", specials),
    }
    _check_config_ids(cfg, ids, specials)
    tokens, types = gguf_vocab_tokens(ranks, specials, cfg.text.vocab_size)
    merges, _ = rebuild_merges(ranks)
    eos, eot, eom = stop_token_ids(d, specials, eos_id)

    u32, T = GGUFValueType.UINT32, Keys.Tokenizer
    kv: KV = {
        T.MODEL: (TOKENIZER_MODEL, GGUFValueType.STRING),
        T.PRE: (TOKENIZER_PRE, GGUFValueType.STRING),
        T.LIST: (tokens, None),
        T.TOKEN_TYPE: (types, None),
        T.MERGES: (merges, None),
        T.BOS_ID: (ids["bos"], u32),
        T.EOS_ID: (eos, u32),
        T.EOT_ID: (eot, u32),
    }
    if eom is not None:
        kv[T.EOM_ID] = (eom, u32)
    if ids["unk"] is not None:
        kv[T.UNK_ID] = (ids["unk"], u32)
    if ids["pad"] is not None:
        kv[T.PAD_ID] = (ids["pad"], u32)
    # §7.1: the Kimi tokenizer adds nothing at either end (the template writes every special token itself).
    kv[T.ADD_BOS] = (False, GGUFValueType.BOOL)
    kv[T.ADD_EOS] = (False, GGUFValueType.BOOL)
    kv[T.CHAT_TEMPLATE] = (load_chat_template(d), GGUFValueType.STRING)
    return kv
