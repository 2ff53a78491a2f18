"""The synthetic vocabulary: a deterministic byte-level BPE trainer, its corpus, and the writers of
``tiktoken.model`` and ``tokenizer_config.json`` in the real layout (docs/model.md §7.2, §8, §13.3).

Only synthetic checkpoints need this; the runtime tokenizer (``kimivl_edge.tokenizer``) reads these files.
"""
from __future__ import annotations

import base64
import heapq
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import tiktoken

from ..tokenizer import N_SPECIAL, PAT_STR, bpe_parts, reserved_name

# Offsets of the named special tokens from the first special id (= the base vocabulary size), as in the real
# tokenizer_config.json; every other id of the 256-token special block is <|reserved_token_{id}|>.
SPECIAL_TOKEN_OFFSETS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|im_middle|>": 17, "<|media_start|>": 18, "<|media_content|>": 19, "<|media_end|>": 20,
    "<|media_pad|>": 21, "[UNK]": 254, "[PAD]": 255,
}
# Special tokens the §7.1 chat template writes (tokenizer_config.json "additional_special_tokens").
TEMPLATE_SPECIALS: tuple[str, ...] = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
    "<|media_start|>", "<|media_content|>", "<|media_end|>", "<|media_pad|>",
)

# ---------------------------------------------------------------------------------------------------------------
# Corpus

_COLOURS = "red green blue yellow purple orange black white grey pink brown cyan".split()
_SHAPES = "circle square triangle star rectangle ellipse cross diamond hexagon line".split()
_PLACES = "left right top bottom centre middle corner edge upper lower".split()
_TEXT = """\
You are a helpful assistant. What is in the picture? Describe the image in detail. Answer with a point (x, y).
Read the word written in the image. Compare the two images. How many shapes are there? Which side is it on?
Let me think step by step about the question before answering. Yes. No. The answer is
def main():\n    print("hello, world")\n    return 0\n
Kimi-VL is a vision-language model: mixture of experts, multi-head latent attention, MoonViT.
中文English混合 こんにちは 안녕하세요 Привет мир café naïve résumé 1234567890 3.14159 100% $5 #1 @user
"""


# The trained tiny model's task (training/tasks.py): its answers, alone on a line as the assistant turn starts
# without a space, and its questions, so that answers and prompts are short in tokens.
_ANSWERS = ("red green blue yellow purple orange circle square triangle star left right first second "
            "1 2 3").split()
_QUESTIONS = """\
What colour is the circle? What shape is the red one? How many shapes are there? Which image has more shapes?
Is the blue star on the left or the right? Where is the green square? Answer with a point (x, y).
What number is written in the image?
"""


def corpus() -> str:
    """Deterministic training text for the synthetic BPE: the words a small visual-question task needs."""
    lines = [_TEXT]
    lines += [_QUESTIONS] * 8
    lines += ["\n".join(_ANSWERS)] * 8
    lines += [f"({x}, {x + 10})\n{x}" for x in range(0, 300, 10)] * 3
    lines += [" ".join(str(n) for n in range(10, 100))] * 3
    for i, c in enumerate(_COLOURS):
        for j, sh in enumerate(_SHAPES):
            p = _PLACES[(i + j) % len(_PLACES)]
            lines.append(f"The {c} {sh} is on the {p} of the image. There are {i + j} {sh}s at ({i * 37}, {j * 23}).")
            lines.append(f"Where is the {c} {sh}? How many {c} {sh}s are there? Is the {sh} {c}?")
    return "\n".join(lines)


def build_vocab(n_base: int) -> list[bytes]:
    """Base vocabulary: BPE trained on corpus(); once the corpus has no pairs left, train_bpe completes it with
    synthetic tokens that are still valid merges (llama.cpp rebuilds merges from the ranks)."""
    return train_bpe([corpus()], n_base - 256)


# ---------------------------------------------------------------------------------------------------------------
# Pre-tokenization without the `regex` module (the trainer's; Tokenizer.encode lets tiktoken split).
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
# BPE trainer

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
# Files: tiktoken.model (§8: one line per token, "base64(bytes) rank") and tokenizer_config.json (§7.2, §13.3)

def write_tiktoken_model(path: str | Path, ranks: Mapping[bytes, int] | Sequence[bytes]) -> None:
    """Write ``tiktoken.model`` sorted by rank. ``ranks`` is {bytes: rank} or the token list in rank order."""
    pairs = sorted(ranks.items(), key=lambda kv: kv[1]) if isinstance(ranks, Mapping) else \
        [(t, r) for r, t in enumerate(ranks)]
    lines = [f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in pairs]
    Path(path).write_text("".join(lines), encoding="ascii")


def special_token_names(base_vocab_size: int) -> dict[int, str]:
    """id -> name for the 256-id special block right after the base vocabulary (SPECIAL_TOKEN_OFFSETS)."""
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
