"""Kimi tokenizer: tiktoken-format BPE + 256 named special tokens (reference doc §7.2, §7.3, §8, §10.4, §13.3–13.4).

Runtime module: needs ``tiktoken`` only. A checkpoint's files are read as data; no code is ever imported from it.

Also holds the small deterministic byte-level BPE trainer used to build synthetic checkpoints, and the writers of
``tiktoken.model`` / ``tokenizer_config.json`` in the real layout.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tiktoken

from .config import N_SPECIAL, SPECIAL_TOKEN_OFFSETS
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
# Special tokens the §7.1 chat template writes (tokenizer_config.json "additional_special_tokens").
TEMPLATE_SPECIALS: tuple[str, ...] = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
    "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
)
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


def write_tiktoken_model(path: str | Path, ranks: Mapping[bytes, int] | Sequence[bytes]) -> None:
    """Write ``tiktoken.model`` sorted by rank. ``ranks`` is {bytes: rank} or the token list in rank order."""
    pairs = sorted(ranks.items(), key=lambda kv: kv[1]) if isinstance(ranks, Mapping) else \
        [(t, r) for r, t in enumerate(ranks)]
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in pairs]
    Path(path).write_text("".join(lines), encoding="ascii")


# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenization without the `regex` module (used by the trainer; Tokenizer.encode lets tiktoken split).
#
# tiktoken compiles PAT_STR with its Rust engine but exposes no "split" call. Three facts give the split exactly:
#  (1) tiktoken's encoder only encodes regex *matches* (unmatched text is skipped), so with the pattern anchored by
#      \A only the match at offset 0 is encoded; with a vocabulary of the 256 single bytes (rank = byte value) the
#      returned ids are the bytes of that first piece;
#  (2) PAT_STR has no look-behind, \b or ^/$ anchors, and its pieces tile any text, so after a piece boundary p the
#      pieces of text[p:] are the remaining pieces of the text: pieces can be peeled off one at a time;
#  (3) some positions c are boundaries whose left side is also split the same way when the text ends there
#      ("safe cuts"): a U+0020 space after a non-whitespace character (no branch runs from a non-space character
#      into a space; the space starts the next piece), and a non-whitespace character after "\n" (no branch runs
#      from a newline into a non-whitespace character, and `\s*[\r\n]+` wins over the look-ahead branch there).
#      "Non-whitespace" uses str.isspace, a superset of the regex's \s, so it errs on the safe side.
# The text is cut at the safe cuts (words, lines) and each segment is peeled piece by piece, so a call never scans
# more than one segment. (Greedy-then-backtrack branches such as [A]*[B]+ can back off arbitrarily far, so a
# fixed-size window would not be exact.)

_SAFE_CUT = re.compile(r"(?<=\S)(?= )|(?<=\n)(?=\S)")
_BYTE_RANKS = {bytes([b]): b for b in range(256)}


class PreTokenizer:
    """Splits text into PAT_STR pieces (§8) using tiktoken's regex engine."""

    def __init__(self, pat_str: str = PAT_STR):
        self._first = tiktoken.Encoding("kimi-first-piece", pat_str=rf"\A(?:{pat_str})",
                                        mergeable_ranks=_BYTE_RANKS, special_tokens={})

    def first_piece(self, text: str) -> str:
        """The piece PAT_STR matches at the start of non-empty ``text``."""
        piece = bytes(self._first.encode_ordinary(text)).decode("utf-8")
        if not piece:
            raise ValueError(f"pre-tokenizer matched nothing at {text[:20]!r}")
        return piece

    def split(self, text: str) -> list[str]:
        """All pieces of ``text`` in order; their concatenation is ``text``."""
        pieces: list[str] = []
        cuts = [m.start() for m in _SAFE_CUT.finditer(text)] + [len(text)]
        start = 0
        for cut in cuts:
            segment = text[start:cut]
            while segment:
                piece = self.first_piece(segment)
                pieces.append(piece)
                segment = segment[len(piece):]
            start = cut
        return pieces


# ---------------------------------------------------------------------------------------------------------------
# BPE trainer for synthetic checkpoints

def bpe_parts(ranks: Mapping[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    """tiktoken-style BPE of ``token``: repeatedly merge the adjacent pair whose concatenation has the lowest rank
    (only ranks < ``max_rank`` if given). llama.cpp rebuilds each merge as bpe_parts(ranks, t, rank(t)) and needs
    exactly two parts (§8)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


class _PairCounter:
    """Weighted pair counts over the distinct pieces of a corpus, updated incrementally as merges are applied."""

    def __init__(self, words: dict[bytes, int]):
        self.words = [list(w) for w in words]  # byte values = initial token ids
        self.freq = list(words.values())
        self.counts: Counter[tuple[int, int]] = Counter()
        self.where: dict[tuple[int, int], set[int]] = {}
        for wi, w in enumerate(self.words):
            for pair in zip(w, w[1:]):
                self.counts[pair] += self.freq[wi]
                self.where.setdefault(pair, set()).add(wi)
        self.heap = [(-c, p) for p, c in self.counts.items()]
        heapq.heapify(self.heap)

    def best(self, banned: set[tuple[int, int]]) -> tuple[int, int] | None:
        """Most frequent pair; ties go to the smallest (left id, right id)."""
        while self.heap:
            negc, pair = self.heap[0]
            if -negc != self.counts.get(pair, 0) or pair in banned or negc == 0:
                heapq.heappop(self.heap)
                continue
            return pair
        return None

    def merge(self, pair: tuple[int, int], new_id: int) -> None:
        """Replace every non-overlapping left-to-right occurrence of ``pair`` by ``new_id``."""
        a, b = pair
        for wi in sorted(self.where.pop(pair, ())):
            w, f = self.words[wi], self.freq[wi]
            for p in zip(w, w[1:]):
                self._add(p, -f, wi)
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            self.words[wi] = out
            for p in zip(out, out[1:]):
                self._add(p, f, wi)
        self.counts.pop(pair, None)

    def _add(self, pair: tuple[int, int], delta: int, wi: int) -> None:
        c = self.counts[pair] + delta
        if delta > 0:
            self.where.setdefault(pair, set()).add(wi)
        if c > 0:
            self.counts[pair] = c
            heapq.heappush(self.heap, (-c, pair))  # lazy heap: stale entries are skipped in best()
        else:
            del self.counts[pair]


def train_bpe(corpus: Iterable[str], n_merges: int) -> list[bytes]:
    """Deterministic byte-level BPE; returns 256 + n_merges token byte strings in rank order (first 256 = bytes).

    Text is split with PAT_STR (§8, see PreTokenizer); pair counts are weighted by piece frequency and never cross
    a piece. Each step merges the most frequent pair (ties: smallest left id, then right id). A merge is kept only
    if the new token t is new and bpe_parts(ranks, t, rank(t)) gives exactly two parts, as llama.cpp's merge
    reconstruction requires; a pair whose bytes already form a token is still merged in the counts (tiktoken would
    merge it too) but adds no token. When the corpus has no pairs left, the vocabulary is completed with checked
    synthetic tokens (see extend_vocab).
    """
    if n_merges < 0:
        raise ValueError("n_merges must be >= 0")
    pre = PreTokenizer()
    words: Counter[bytes] = Counter()
    for text in corpus:
        words.update(p.encode("utf-8") for p in pre.split(text))
    tokens = [bytes([b]) for b in range(256)]
    ranks = {t: i for i, t in enumerate(tokens)}
    counter = _PairCounter(dict(sorted(words.items())))
    banned: set[tuple[int, int]] = set()
    while len(tokens) < 256 + n_merges:
        pair = counter.best(banned)
        if pair is None:
            break
        merged = tokens[pair[0]] + tokens[pair[1]]
        if merged in ranks:
            counter.merge(pair, ranks[merged])
        elif len(bpe_parts(ranks, merged)) == 2:
            ranks[merged] = len(tokens)
            tokens.append(merged)
            counter.merge(pair, ranks[merged])
        else:
            banned.add(pair)
    return extend_vocab(tokens, 256 + n_merges)


def extend_vocab(tokens: Sequence[bytes], n_total: int) -> list[bytes]:
    """``tokens`` completed to ``n_total`` entries with deterministic synthetic tokens: token + one byte, over the
    tokens in rank order and bytes 0..255, keeping only new strings whose lower-rank BPE gives exactly two parts
    (so every token stays a valid merge for llama.cpp, §8)."""
    out = list(tokens)
    ranks = {t: i for i, t in enumerate(out)}
    if len(ranks) != len(out):
        raise ValueError("duplicate tokens")
    x = 0
    while len(out) < n_total:
        head = out[x]
        for y in range(256):
            if len(out) >= n_total:
                break
            t = head + bytes([y])
            if t not in ranks and len(bpe_parts(ranks, t)) == 2:
                ranks[t] = len(out)
                out.append(t)
        x += 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# tokenizer_config.json (real layout, §7.2, §13.3)

def special_token_names(base_vocab_size: int) -> dict[int, str]:
    """id -> name for the 256-id special block right after the base vocabulary (config.SPECIAL_TOKEN_OFFSETS)."""
    names = {base_vocab_size + i: reserved_name(base_vocab_size + i) for i in range(N_SPECIAL)}
    for name, off in SPECIAL_TOKEN_OFFSETS.items():
        names[base_vocab_size + off] = name
    return names


def write_tokenizer_config(path: str | Path, base_vocab_size: int, chat_template: str | None = None) -> None:
    """Write ``tokenizer_config.json`` as the real checkpoints lay it out."""
    decoder = {
        str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, name in sorted(special_token_names(base_vocab_size).items())
    }
    cfg: dict = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(TEMPLATE_SPECIALS),
        "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1048576,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    Path(path).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_special_tokens(path: str | Path, n_base: int) -> dict[str, int]:
    """name -> id from ``added_tokens_decoder`` (§7.2); every id must lie above the base ranks and names be unique.
    Unnamed ids of the 256-block get <|reserved_token_{id}|>."""
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


def _ids_of(value: object) -> list[int]:
    """An ``eos_token_id`` field (int or list of ints) as a list."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """tiktoken BPE over PAT_STR plus named special tokens (§8). Encoding adds nothing at the ends (§7.1)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_ids: dict[str, int],
                 extra_stop_ids: Iterable[int] = ()):
        self.n_base = len(mergeable_ranks)
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
        for tid in self.stop_ids:
            self._check_id(tid)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path) -> "Tokenizer":
        """Load ``tiktoken.model`` + ``tokenizer_config.json`` (+ ``generation_config.json`` stop ids if present).
        If ``config.json`` is present, its ``media_placeholder_token_id`` must equal <|media_pad|> (§7.2, §10.4)."""
        d = Path(ckpt_dir)
        ranks = read_tiktoken_model(d / "tiktoken.model")
        specials = read_special_tokens(d / "tokenizer_config.json", len(ranks))
        extra: list[int] = []
        if (d / "generation_config.json").is_file():
            extra = _ids_of(read_json_object(d / "generation_config.json").get("eos_token_id"))
        tok = cls(ranks, specials, extra_stop_ids=extra)
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

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_names

    def encode(self, text: str) -> list[int]:
        """Special-token strings are split out first (all allowed), the rest is BPE over PAT_STR (§8)."""
        ids: list[int] = []
        for piece in _cut_long_input(text):
            ids.extend(self._enc.encode(piece, allowed_special="all"))
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
