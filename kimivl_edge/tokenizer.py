"""Kimi tokenizer: tiktoken-format BPE + 256 named special tokens (docs/model.md §7.2, §7.3, §8, §10.4, §13.3–13.4).

Runtime module: needs ``tiktoken`` only. A checkpoint's files are read as data; no code is ever imported from it.
Also the tokenizer facts the converter shares: lower-rank BPE (how llama.cpp rebuilds merges from the ranks) and
the GPT-2 byte-to-unicode alphabet of GGUF token texts. The synthetic-checkpoint trainer and the writers of
``tiktoken.model`` / ``tokenizer_config.json`` live in ``kimivl_edge.synth.vocab``.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tiktoken

from .errors import CheckpointError, read_json_object

# §8: the Kimi pre-tokenizer, eight branches joined with "|" (data, verbatim; the fifth starts with a space).
PAT_BRANCHES: tuple[str, ...] = (
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
)
PAT_STR: str = "|".join(PAT_BRANCHES)

# Names the runtime needs (§7.1–7.3); a checkpoint whose added_tokens_decoder lacks one is rejected.
REQUIRED_SPECIALS: tuple[str, ...] = (
    "[BOS]", "[EOS]", "<|im_end|>", "<|media_pad|>", "<|media_start|>", "<|media_content|>", "<|media_end|>",
    "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
)
# §7.2: the special block is 256 ids right after the base vocabulary; unnamed ones are <|reserved_token_{id}|>.
N_SPECIAL = 256
# §8: inputs are encoded in pieces of at most 400 000 characters, none holding a run of more than 25 000
# consecutive whitespace or non-whitespace characters (guards the regex/BPE against pathological inputs).
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def reserved_name(token_id: int) -> str:
    """Name of an unnamed id of the special block (§7.2)."""
    return f"<|reserved_token_{token_id}|>"


# ---------------------------------------------------------------------------------------------------------------
# tiktoken.model I/O (§8: one line per token, "base64(bytes) rank")

def read_tiktoken_model(path: str | Path) -> dict[bytes, int]:
    """Read ``tiktoken.model``; ranks must be exactly 0..n-1 and tokens unique (else CheckpointError)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the tokenizer's BPE ranks)")
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            token, rank = _parse_rank_line(path, lineno, line)
            if token in ranks:
                raise CheckpointError(f"{path}:{lineno}: token {token!r} listed twice")
            if rank in seen_ranks:
                raise CheckpointError(f"{path}:{lineno}: rank {rank} listed twice")
            ranks[token] = rank
            seen_ranks.add(rank)
    n = len(ranks)
    if n == 0:
        raise CheckpointError(f"{path}: empty")
    if min(seen_ranks) != 0 or max(seen_ranks) != n - 1:
        lo, hi = min(seen_ranks), max(seen_ranks)
        raise CheckpointError(f"{path}: ranks are not contiguous 0..{n - 1} (found {lo}..{hi})")
    return ranks


def _parse_rank_line(path: Path, lineno: int, line: bytes) -> tuple[bytes, int]:
    parts = line.split()
    if len(parts) != 2:
        raise CheckpointError(f"{path}:{lineno}: expected 'base64 rank', got {len(parts)} fields")
    try:
        token = base64.b64decode(parts[0], validate=True)
        rank = int(parts[1])
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{path}:{lineno}: malformed line (bad base64 or rank)") from None
    if not token or rank < 0:
        raise CheckpointError(f"{path}:{lineno}: empty token or negative rank")
    return token, rank


# ---------------------------------------------------------------------------------------------------------------
# Lower-rank BPE (§8)

def bpe_parts(ranks: Mapping[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    """tiktoken-style BPE of ``token``: repeatedly merge the adjacent pair whose concatenation has the lowest rank,
    leftmost first (only ranks < ``max_rank`` if given). llama.cpp rebuilds each merge as
    ``bpe_parts(ranks, t, rank(t))`` and needs exactly two parts (§8). Pair ranks are cached and only the two
    neighbours of a merge are looked up again, so a token of n bytes costs O(n) lookups plus O(n^2) comparisons."""
    limit = sys.maxsize if max_rank is None else max_rank
    parts = [token[i:i + 1] for i in range(len(token))]

    def rank(a: bytes, b: bytes) -> int:
        r = ranks.get(a + b, limit)
        return r if r < limit else limit

    pair = [rank(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
    while pair:
        best = min(pair)
        if best >= limit:
            break
        i = pair.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        del pair[i]
        if i > 0:
            pair[i - 1] = rank(parts[i - 1], parts[i])
        if i < len(pair):
            pair[i] = rank(parts[i], parts[i + 1])
    return parts


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 byte-to-unicode alphabet (§8: how GGUF token texts spell a base token's bytes)

def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> character table: the 188 printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 bytes, in increasing order, get U+0100, U+0101, ... (so no token text holds a space or
    a control character)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + extra))
            extra += 1
    return tuple(table)


BYTE_ALPHABET: tuple[str, ...] = _byte_alphabet()  # byte value -> its character
_TO_ALPHABET = dict(enumerate(BYTE_ALPHABET))  # str.translate: Latin-1 character (= byte) -> alphabet character
# str.translate back to Latin-1; a raw character the alphabet replaces maps to U+FFFF, so Latin-1 encoding fails.
_FROM_ALPHABET = {ord(c): chr(b) for b, c in enumerate(BYTE_ALPHABET)} | \
    {b: "\uffff" for b, c in enumerate(BYTE_ALPHABET) if ord(c) != b}


def encode_byte_alphabet(token: bytes) -> str:
    """A base token's bytes as GGUF token text: one alphabet character per byte."""
    return token.decode("latin-1").translate(_TO_ALPHABET)


def decode_byte_alphabet(text: str) -> bytes:
    """The bytes of a GGUF token text; ValueError if a character is not in the alphabet."""
    try:
        return text.translate(_FROM_ALPHABET).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"token {text!r} is not in GPT-2 byte form") from None


# ---------------------------------------------------------------------------------------------------------------
# tokenizer_config.json and generation_config.json (§7.2, §7.3)

def read_special_tokens(path: str | Path, n_base: int) -> dict[str, int]:
    """name -> id from ``added_tokens_decoder`` (§7.2); every id must lie in the 256-id block right after the base
    ranks and names be unique. Unnamed ids of the block get <|reserved_token_{id}|>."""
    cfg = read_json_object(Path(path))
    dec = cfg.get("added_tokens_decoder")
    if not isinstance(dec, dict) or not dec:
        raise CheckpointError(f"{path}: no added_tokens_decoder")
    specials: dict[str, int] = {}
    for key, entry in dec.items():
        try:
            tid, name = int(key), entry["content"]
        except (ValueError, TypeError, KeyError):
            raise CheckpointError(f"{path}: malformed added_tokens_decoder entry {key!r}") from None
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{path}: added_tokens_decoder entry {key!r} has no string content")
        if tid < n_base:
            raise CheckpointError(f"{path}: special token {name!r} id {tid} collides with base rank (< {n_base})")
        if tid >= n_base + N_SPECIAL:
            raise CheckpointError(f"{path}: special token {name!r} id {tid} is past the {N_SPECIAL}-id special block "
                                  f"({n_base}..{n_base + N_SPECIAL - 1})")
        if name in specials:
            raise CheckpointError(f"{path}: special token {name!r} listed twice ({specials[name]}, {tid})")
        specials[name] = tid
    taken = set(specials.values())
    for tid in range(n_base, n_base + N_SPECIAL):
        if tid not in taken:
            specials.setdefault(reserved_name(tid), tid)
    missing = [n for n in REQUIRED_SPECIALS if n not in specials]
    if missing:
        raise CheckpointError(f"{path}: added_tokens_decoder lacks {', '.join(missing)}")
    return specials


def generation_stop_ids(ckpt_dir: str | Path) -> list[int]:
    """The ``eos_token_id`` of ``generation_config.json`` (an id or a list of ids) as a list; [] without the file
    or the key. Anything else is a CheckpointError: a stop id silently dropped would let generation run on (§7.3)."""
    path = Path(ckpt_dir) / "generation_config.json"
    if not path.is_file():
        return []
    value = read_json_object(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value] if value is not None else []
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{path}: eos_token_id must be an id or a list of ids, got {value!r}")
    return values


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """tiktoken BPE over PAT_STR plus named special tokens (§8). Encoding adds nothing at the ends (§7.1)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_ids: dict[str, int],
                 extra_stop_ids: Iterable[int] = ()):
        self.n_base = len(mergeable_ranks)
        missing_bytes = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing_bytes:  # tiktoken's BPE indexes every single byte: without one it panics mid-encode
            raise CheckpointError(f"the base vocabulary lacks {len(missing_bytes)} single-byte tokens (first "
                                  f"0x{missing_bytes[0]:02x}); byte-level BPE needs all 256")
        for name, tid in special_ids.items():
            if tid < self.n_base:
                raise CheckpointError(f"special token {name!r} id {tid} collides with base rank (< {self.n_base})")
        if len(set(special_ids.values())) != len(special_ids):
            raise CheckpointError("two special token names share one id")
        missing = [n for n in REQUIRED_SPECIALS if n not in special_ids]
        if missing:
            raise CheckpointError(f"tokenizer lacks special tokens {', '.join(missing)}")
        self.special_ids = dict(special_ids)
        self._special_names = {i: n for n, i in special_ids.items()}
        self.n_vocab = max(self.n_base, max(special_ids.values()) + 1)
        self._enc = tiktoken.Encoding("kimi", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special_ids)
        self._special_re = re.compile("|".join(re.escape(n) for n in sorted(self.special_ids, key=len, reverse=True)))
        self.bos_id = self.id_of("[BOS]")
        self.eos_id = self.id_of("[EOS]")
        self.pad_id = self.special_ids.get("[PAD]")
        self.im_end_id = self.id_of("<|im_end|>")
        self.media_pad_id = self.id_of("<|media_pad|>")
        self.media_start_id = self.id_of("<|media_start|>")
        self.media_content_id = self.id_of("<|media_content|>")
        self.media_end_id = self.id_of("<|media_end|>")
        stops = [self.eos_id, self.im_end_id, *extra_stop_ids]  # §7.3: always [EOS] and <|im_end|>
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))
        unknown = [t for t in self.stop_ids if not (0 <= t < self.n_base or t in self._special_names)]
        if unknown:  # a stop id the vocabulary lacks would never stop generation, or fail at decode
            raise CheckpointError(f"stop token id {unknown[0]} is not in the vocabulary (0..{self.n_vocab - 1})")

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "Tokenizer":
        """Load ``tiktoken.model`` + ``tokenizer_config.json`` (+ ``generation_config.json`` stop ids if present).
        If ``config.json`` is present, its ``media_placeholder_token_id`` must equal <|media_pad|> (§7.2, §10.4)."""
        d = Path(ckpt_dir)
        ranks = read_tiktoken_model(d / "tiktoken.model")
        specials = read_special_tokens(d / "tokenizer_config.json", len(ranks))
        tok = cls(ranks, specials, extra_stop_ids=generation_stop_ids(d))
        if (d / "config.json").is_file():
            media = read_json_object(d / "config.json").get("media_placeholder_token_id")
            if media is not None and media != tok.media_pad_id:
                raise CheckpointError(f"{d}: config.json media_placeholder_token_id {media} != <|media_pad|> "
                                      f"id {tok.media_pad_id} in tokenizer_config.json (renumbered specials?)")
        return tok

    def id_of(self, name: str) -> int:
        """Id of a special token by name (§7.2: ids are resolved by name, never hard-coded)."""
        try:
            return self.special_ids[name]
        except KeyError:
            raise CheckpointError(f"tokenizer has no special token {name!r}") from None

    def encode(self, text: str) -> list[int]:
        """Special-token strings are split out first (all allowed), the rest is BPE over PAT_STR (§8)."""
        ids: list[int] = []
        for piece in _cut_long_input(text):
            ids.extend(self._enc.encode(piece, allowed_special="all"))
        return ids

    def encode_except(self, text: str, plain: Sequence[tuple[int, int]]) -> list[int]:
        """``encode``, except that special-token text overlapping one of the ``plain`` character spans is ordinary
        text (BPE). With no special-token text in those spans the ids equal ``encode(text)`` exactly. This is how a
        prompt keeps user-typed ``<|im_end|>`` from forging a turn: the spans are the messages' content."""
        ids: list[int] = []
        offset = 0
        for piece in _cut_long_input(text):
            ids.extend(self._encode_piece(piece, [(a - offset, b - offset) for a, b in plain]))
            offset += len(piece)
        return ids

    def _encode_piece(self, text: str, plain: list[tuple[int, int]]) -> list[int]:
        ids: list[int] = []
        start = pos = 0
        while (m := self._special_re.search(text, pos)) is not None:
            if any(a < m.end() and m.start() < b for a, b in plain):
                pos = m.start() + 1
                continue
            ids.extend(self._enc.encode_ordinary(text[start:m.start()]))
            ids.append(self.special_ids[m.group()])
            start = pos = m.end()
        ids.extend(self._enc.encode_ordinary(text[start:]))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """BPE only: special-token strings are treated as plain text."""
        ids: list[int] = []
        for piece in _cut_long_input(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one id; a special token's bytes are its name in UTF-8."""
        self._check_id(token_id)
        return self._enc.decode_single_token_bytes(token_id)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        for tid in ids:
            self._check_id(tid)
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Byte-level decode (§8); invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_id(self, token_id: int) -> None:
        if not (0 <= token_id < self.n_base or token_id in self._special_names):
            raise ValueError(f"token id {token_id} is not in the vocabulary (0..{self.n_vocab - 1})")


def _cut_long_input(text: str) -> Iterator[str]:
    """§8: cut into <= 400 000-char pieces, none with a run of > 25 000 whitespace or non-whitespace chars."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start:start + MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:
            yield chunk
        else:
            yield from _cut_runs(chunk, MAX_RUN_CHARS)


def _cut_runs(text: str, limit: int) -> Iterator[str]:
    """Cut before the (limit+1)-th character of every run of same-kind (whitespace / non-whitespace) characters."""
    cut, run, kind = 0, 0, None
    for i, ch in enumerate(text):
        k = ch.isspace()
        run = run + 1 if k == kind else 1
        kind = k
        if run > limit:
            yield text[cut:i]
            cut, run = i, 1
    yield text[cut:]


class StreamDecoder:
    """Incremental decode: ``feed(id)`` returns the text completed by that token; an incomplete UTF-8 sequence is
    held back until its last byte arrives (§8), so no U+FFFD appears mid-character. ``flush()`` ends the stream."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token_id), final=False)

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
