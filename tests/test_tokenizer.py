"""Kimi tokenizer (docs/model.md §7.2, §7.3, §8): trainer, file formats, encode/decode, streaming.

Independent references used here: a naive pure-Python BPE and a naive trainer written below, the `regex` package
(PAT_STR compiled in VERSION1 mode, where `&&` is class intersection) as the pre-tokenizer oracle, Python's own
UTF-8 codec, and the literal facts of docs/model.md.
"""
from __future__ import annotations

import base64
import json
from collections import Counter

import pytest
import regex  # a dependency of tiktoken; used here only as an independent oracle

from kimivl_edge.errors import CheckpointError
from kimivl_edge.synth import (
    SPECIAL_TOKEN_OFFSETS,
    PreTokenizer,
    train_bpe,
    write_tiktoken_model,
    write_tokenizer_config,
)
from kimivl_edge.tokenizer import (
    BYTE_ALPHABET,
    N_SPECIAL,
    PAT_STR,
    StreamDecoder,
    Tokenizer,
    bpe_parts,
    decode_byte_alphabet,
    encode_byte_alphabet,
    read_tiktoken_model,
)

ORACLE = regex.compile("(?V1)" + PAT_STR)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox doesn't.\n",
    "What is the dome building in the picture? It's the Capitol, isn't it? I'll look again.\n",
    "Numbers: 12345 and 678, 2025-01-31, 3.14159; prices $10.50 and $7.\n\n",
    "中文English混合 and 日本語のテキスト, Ünïcödé façade naïve café.\r\n",
    "    indented code:\n\tif x == 1:\n\t\treturn x  # comment\n",
    "digits 1234567890 0123456789 9012345678 8901234567\n",
] * 3
N_MERGES = 300


def oracle_pieces(text: str) -> list[str]:
    return ORACLE.findall(text)


def naive_bpe(ranks: dict[bytes, int], piece: bytes, max_rank: int | None = None) -> list[bytes]:
    """Reference BPE: merge the adjacent pair whose concatenation has the lowest rank until none is left."""
    parts = [bytes([b]) for b in piece]
    while True:
        cands = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                 if parts[i] + parts[i + 1] in ranks
                 and (max_rank is None or ranks[parts[i] + parts[i + 1]] < max_rank)]
        if not cands:
            return parts
        _, i = min(cands)
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def naive_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    return [ranks[p] for piece in oracle_pieces(text) for p in naive_bpe(ranks, piece.encode())]


def load_ranks_independently(path) -> dict[bytes, int]:
    out = {}
    for line in path.read_text().splitlines():
        tok, rank = line.split(" ")
        out[base64.b64decode(tok)] = int(rank)
    return out


@pytest.fixture(scope="module")
def trained() -> list[bytes]:
    return train_bpe(CORPUS, N_MERGES)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, trained):
    d = tmp_path_factory.mktemp("tok")
    write_tiktoken_model(d / "tiktoken.model", trained)
    write_tokenizer_config(d / "tokenizer_config.json", len(trained), chat_template="{{ messages }}")
    return d


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def ranks(ckpt) -> dict[bytes, int]:
    return load_ranks_independently(ckpt / "tiktoken.model")


# ---------------------------------------------------------------------------------------------------------------
# pre-tokenizer

def test_pat_str_shape():
    # landmarks of the §8 pattern (the full text is exercised against the doc's examples and the regex oracle)
    assert PAT_STR.startswith(r"[\p{Han}]+|")
    assert PAT_STR.endswith(r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    assert r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|" in PAT_STR  # the fifth branch starts with a space


def test_doc_example_han_split():
    # §8: "中文English混合" -> ["中文", "English", "混合"]
    assert PreTokenizer().split("中文English混合") == ["中文", "English", "混合"]
    assert oracle_pieces("中文English混合") == ["中文", "English", "混合"]


def test_pre_tokenizer_known_pieces():
    # Read off the regex by hand: contractions stay on the word, digits go in threes, a space joins the next word.
    assert PreTokenizer().split("I'm fine, don't 1234567") == ["I'm", " fine", ",", " don't", " ", "123", "456", "7"]


LONG_TEXTS = [
    "x" + " " * 700 + "y",                   # whitespace run longer than the window, with look-ahead at its end
    "a" * 900 + "'ll be",                    # long word + contraction
    "Z" * 300 + "z" * 300 + " ok",
    "!" * 1000 + "\n\n" + "?",
    "中" * 600 + "abc",
    "w" * 251 + "'re x",
    "w" * 254 + "'ll do it",                 # a contraction cut by the first window's edge
    "A" * 253 + " ab",                       # a piece ending just before the window's edge
    "a  \n" + " " * 300 + "\n x",            # \s*[\r\n]+ backs off to the last newline of a long run
    "\n" + " " * 600 + "\n\n" + "y",
    ("word " + " " * 40 + "\n") * 30 + "end",
    "ナカ" * 3 + "Ǆǅ" * 300 + "a",             # [A]*[B]+ backs off over 600 title/upper-case letters
    " " * 255 + "\n" + " " * 3 + "q",
]


@pytest.mark.parametrize("text", CORPUS[:5] + LONG_TEXTS + [
    "  leading and trailing  ", "tabs\t\tand\r\nCRLF\r\n\r\n", "ÀÉÎõü ÇA va? ça VA.", "emoji 😀👍🏽 ok",
    "mixed123abc456DEF", "a\u0301b\u0302 combining", "Ελληνικά Кириллица العربية עברית", "''' \"\" ``",
])
def test_pre_tokenizer_matches_regex_oracle(text):
    pieces = PreTokenizer().split(text)
    assert pieces == oracle_pieces(text)
    assert "".join(pieces) == text


def test_pre_tokenizer_fuzz_against_oracle():
    # Seeded random texts made of runs (up to 400 chars) of the character kinds the branches distinguish.
    import random

    kinds = [" ", "\n", "\r\n", "\r", "\t", "\x0b", "\x1c", "\x85", "\xa0", "\u3000", "ab", "AB", "Ǆǅ", "'s", "'LL",
             "'", "12", "²", "中文", "ナカ", "a\u0301", "\u0301", ".,!", "😀", "ʰ", "-", "é"]
    rng = random.Random(1234)
    pre = PreTokenizer()
    for _ in range(400):
        text = "".join(rng.choice(kinds) * rng.choice([1, 1, 2, 3, 40, 260]) for _ in range(rng.randint(1, 12)))
        assert pre.split(text) == oracle_pieces(text), repr(text[:80])


# ---------------------------------------------------------------------------------------------------------------
# trainer

def naive_train(corpus: list[str], n_merges: int) -> list[bytes]:
    """The documented algorithm, recounting everything each step: most frequent pair within pieces, ties to the
    smallest (left id, right id); a merge whose bytes already exist is applied without a new token."""
    words = Counter(p.encode() for t in corpus for p in oracle_pieces(t))
    segs = {w: [bytes([b]) for b in w] for w in words}
    tokens = [bytes([b]) for b in range(256)]
    rank = {t: i for i, t in enumerate(tokens)}
    while len(tokens) < 256 + n_merges:
        counts: Counter = Counter()
        for w, seg in segs.items():
            for a, b in zip(seg, seg[1:]):
                counts[(rank[a], rank[b])] += words[w]
        if not counts:
            break
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ta, tb = tokens[a], tokens[b]
        if ta + tb not in rank:
            assert len(naive_bpe(rank, ta + tb)) == 2  # the skip rule never fires in this short run
            rank[ta + tb] = len(tokens)
            tokens.append(ta + tb)
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and seg[i] == ta and seg[i + 1] == tb:
                    out.append(ta + tb)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = out
    return tokens


def test_trainer_matches_naive_trainer():
    assert train_bpe(CORPUS, 150) == naive_train(CORPUS, 150)


def test_trainer_until_corpus_exhausted():
    corpus = ["aa c a c d a c d d a c d a aa c d aa d c aa d a d d", "Tic tac toe, tic-tac-toe! 1 12 123 1234"]
    ref = naive_train(corpus, 100)  # stops when no pair is left
    assert 256 < len(ref) < 356
    assert train_bpe(corpus, 100)[:len(ref)] == ref


def test_trainer_basic_properties(trained):
    assert len(trained) == 256 + N_MERGES
    assert trained[:256] == [bytes([b]) for b in range(256)]
    assert len(set(trained)) == len(trained)
    assert train_bpe(CORPUS, N_MERGES) == trained  # deterministic
    assert train_bpe(list(reversed(CORPUS)), N_MERGES) == trained  # order of the corpus does not matter
    # frequent words of the corpus became single tokens
    assert b" the" in trained and b" fox" in trained


def test_every_merge_is_two_lower_rank_tokens(trained):
    rank = {t: i for i, t in enumerate(trained)}
    for r, t in enumerate(trained[256:], 256):
        assert any(t[:k] in rank and rank[t[:k]] < r and t[k:] in rank and rank[t[k:]] < r
                   for k in range(1, len(t))), t
        # llama.cpp's merge reconstruction: BPE over lower ranks must end in exactly two parts (§8)
        assert len(naive_bpe(rank, t, max_rank=r)) == 2, t


def test_trainer_fills_beyond_corpus():
    tokens = train_bpe(["ab ab ab"], 400)  # the corpus supports only a couple of merges
    assert len(tokens) == 656 and len(set(tokens)) == 656
    rank = {t: i for i, t in enumerate(tokens)}
    for r, t in enumerate(tokens[256:], 256):
        assert len(naive_bpe(rank, t, max_rank=r)) == 2, t


def test_bpe_parts_matches_naive_bpe(trained):
    # the one lower-rank BPE (trainer and converter merges): against the naive re-scan, with and without a limit
    rank = {t: i for i, t in enumerate(trained)}
    for r, t in enumerate(trained):
        assert bpe_parts(rank, t, r) == naive_bpe(rank, t, max_rank=r), t
    for word in [b" the quick fox", "naïve café 中文".encode(), b"aaaaaaaaaa", b"", b"x", b"\xff\xfe\x00 1234567"]:
        assert bpe_parts(rank, word) == naive_bpe(rank, word), word
        assert bpe_parts(rank, word, 256) == [bytes([b]) for b in word]  # only single bytes below rank 256


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 byte alphabet (GGUF token texts)

def gpt2_bytes_to_unicode() -> dict[int, str]:
    """OpenAI's GPT-2 encoder.py bytes_to_unicode, transcribed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_byte_alphabet_is_gpt2s():
    oracle = gpt2_bytes_to_unicode()
    assert list(BYTE_ALPHABET) == [oracle[b] for b in range(256)]
    everything = bytes(range(256))
    assert encode_byte_alphabet(everything) == "".join(oracle[b] for b in range(256))
    assert decode_byte_alphabet(encode_byte_alphabet(everything)) == everything
    assert encode_byte_alphabet(" café".encode()) == "ĠcafÃ©"  # the familiar GPT-2 spelling of a space and é


@pytest.mark.parametrize("text", [" a", "a\nb", "\x00", "\xad", "€", "\u0144"])
def test_byte_alphabet_rejects_characters_outside_it(text):
    # a raw space, newline, NUL or soft hyphen is spelled by another character; € and U+0144 (one past the 68 moved
    # bytes) are not in the alphabet at all
    with pytest.raises(ValueError):
        decode_byte_alphabet(text)


# ---------------------------------------------------------------------------------------------------------------
# files

def test_tiktoken_model_roundtrip(tmp_path, trained):
    p = tmp_path / "tiktoken.model"
    write_tiktoken_model(p, {t: i for i, t in enumerate(trained)})
    lines = p.read_text().splitlines()
    assert len(lines) == len(trained)
    assert lines[65] == f"{base64.b64encode(b'A').decode()} 65"
    assert read_tiktoken_model(p) == {t: i for i, t in enumerate(trained)}


def test_tokenizer_config_layout(ckpt, trained):
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    n = len(trained)
    dec = cfg["added_tokens_decoder"]
    assert sorted(map(int, dec)) == list(range(n, n + 256))
    for name, off in SPECIAL_TOKEN_OFFSETS.items():
        assert dec[str(n + off)]["content"] == name
    assert dec[str(n + 5)]["content"] == f"<|reserved_token_{n + 5}|>"
    assert dec[str(n + 21)] == {"content": "<|media_pad|>", "lstrip": False, "normalized": False,
                                "rstrip": False, "single_word": False, "special": True}
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == ("[BOS]", "[EOS]", "[PAD]",
                                                                                        "[UNK]")
    assert cfg["tokenizer_class"] == "TikTokenTokenizer"
    assert cfg["auto_map"] == {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer", None]}
    assert cfg["model_max_length"] == 1048576 and cfg["clean_up_tokenization_spaces"] is False
    assert cfg["chat_template"] == "{{ messages }}"
    assert {"<|im_end|>", "<|media_pad|>", "<|im_middle|>"} <= set(cfg["additional_special_tokens"])


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

def test_special_ids(tok, trained):
    n = len(trained)
    assert tok.n_base == n and tok.n_vocab == n + N_SPECIAL
    assert (tok.bos_id, tok.eos_id, tok.im_end_id, tok.pad_id) == (n, n + 1, n + 2, n + 255)
    assert (tok.media_start_id, tok.media_content_id, tok.media_end_id, tok.media_pad_id) == (
        n + 18, n + 19, n + 20, n + 21)
    assert tok.id_of("<|im_system|>") == n + 10 and tok.id_of("<|im_middle|>") == n + 17
    assert tok.special_ids[f"<|reserved_token_{n + 100}|>"] == n + 100
    assert set(tok.stop_ids) == {n + 1, n + 2}  # §7.3
    with pytest.raises(CheckpointError):
        tok.id_of("<|no_such_token|>")


def test_special_strings_are_split_out_first(tok, ranks, trained):
    n = len(trained)
    assert tok.encode("<|im_end|>") == [n + 2]
    text = "hello<|im_user|>user<|im_middle|>What?<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    expected = (naive_encode(ranks, "hello") + [n + 3] + naive_encode(ranks, "user") + [n + 17]
                + naive_encode(ranks, "What?") + [n + 18] + naive_encode(ranks, "image") + [n + 19, n + 21, n + 20])
    assert tok.encode(text) == expected
    assert tok.encode(f"<|reserved_token_{n + 30}|>") == [n + 30]
    assert tok.decode(expected) == text


ENCODE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the dome building in the picture? It's the Capitol.",
    "   spaced    out\n\n\nlines\r\n",
    "numbers 1234567890 and 3.14",
    "中文English混合",
    "naïve café Ünïcödé",
    "unseen words: xylophone quizzical zephyr",
    "emoji 😀👍🏽 and symbols ∑∫√ ◁think▷ done ◁/think▷",
]


@pytest.mark.parametrize("text", ENCODE_TEXTS)
def test_encode_matches_naive_bpe(tok, ranks, text):
    assert tok.encode(text) == naive_encode(ranks, text)


def test_han_pieces_encode_separately(tok):
    assert tok.encode("中文English混合") == tok.encode("中文") + tok.encode("English") + tok.encode("混合")


@pytest.mark.parametrize("text", ENCODE_TEXTS + [
    "", "a", "Ελληνικά Кириллица العربية עברית हिन्दी", "a\u0301e\u0308 \u200d\u2060 \U0010ffff", "\t\r\n \x00\x7f",
])
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_nothing_added_at_ends(tok, ranks):
    assert tok.encode("Hi") == naive_encode(ranks, "Hi")
    assert tok.bos_id not in tok.encode("Hi") and tok.encode("") == []


def test_long_runs_are_cut(tok, ranks):
    # §8: no run of more than 25 000 same-kind characters reaches the regex: cut before the 25 001st. Digits go in
    # threes, so the cut (25 000 = 3 * 8333 + 1) shifts the grouping of everything after it.
    text = "1234567890" * 3000 + "  x"
    expected = naive_encode(ranks, text[:25000]) + naive_encode(ranks, text[25000:])
    assert expected != naive_encode(ranks, text)  # the cut matters for this text
    assert tok.encode(text) == expected


def test_decode_invalid_utf8_replaced(tok):
    assert tok.decode([0xE4, ord("a")]) == "\ufffda"  # ranks 0..255 are the single bytes
    with pytest.raises(ValueError):
        tok.decode([tok.n_vocab + 5])


def test_stream_decoder(tok):
    text = "Grüße 中文 😀 ok ◁think▷ x ◁/think▷ é"
    ids = tok.encode(text)
    # the test is only meaningful if some token ends inside a multibyte character
    assert any(_incomplete(tok.token_bytes(i)) for i in ids)
    sd = StreamDecoder(tok)
    chunks = [sd.feed(i) for i in ids] + [sd.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


def test_stream_decoder_flushes_truncated_char(tok):
    sd = StreamDecoder(tok)
    assert sd.feed(0xE4) == "" and sd.feed(0xB8) == ""
    assert sd.flush() == "\ufffd"  # same as a one-shot decode of the incomplete sequence
    assert b"\xe4\xb8".decode("utf-8", errors="replace") == "\ufffd"


def _incomplete(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# ---------------------------------------------------------------------------------------------------------------
# validation

def _copy_ckpt(src, dst):
    for f in ("tiktoken.model", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.mark.parametrize("lines,why", [
    (["QQ== 0", "Qg== 2"], "gap"),
    (["QQ== 0", "Qg== 0"], "duplicate rank"),
    (["QQ== 0", "QQ== 1"], "duplicate token"),
    (["QQ== 1", "Qg== 2"], "not from 0"),
    (["Q!== 0"], "bad base64"),
    (["QQ==0"], "one field"),
    (["QQ== x"], "bad rank"),
    ([], "empty"),
])
def test_bad_tiktoken_model(tmp_path, lines, why):
    p = tmp_path / "tiktoken.model"
    p.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(CheckpointError) as e:
        read_tiktoken_model(p)
    assert "\n" not in str(e.value)


def test_missing_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        Tokenizer.from_checkpoint(tmp_path)
    (tmp_path / "tiktoken.model").write_bytes((ckpt / "tiktoken.model").read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_checkpoint(tmp_path)


def _edit_config(d, fn):
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def test_special_colliding_with_base_rank(tmp_path, ckpt, trained):
    d = _copy_ckpt(ckpt, tmp_path)
    _edit_config(d, lambda c: c["added_tokens_decoder"].update(
        {"100": {"content": "<|evil|>", "special": True}}))
    with pytest.raises(CheckpointError, match="collides"):
        Tokenizer.from_checkpoint(d)


@pytest.mark.parametrize("name", ["[BOS]", "[EOS]", "<|im_end|>", "<|media_pad|>", "<|media_start|>",
                                  "<|media_content|>", "<|media_end|>", "<|im_user|>", "<|im_assistant|>",
                                  "<|im_system|>", "<|im_middle|>"])
def test_missing_required_special(tmp_path, ckpt, trained, name):
    d = _copy_ckpt(ckpt, tmp_path)
    off = SPECIAL_TOKEN_OFFSETS[name]
    _edit_config(d, lambda c: c["added_tokens_decoder"][str(len(trained) + off)].update({"content": "<|other|>"}))
    with pytest.raises(CheckpointError, match="lacks") as e:
        Tokenizer.from_checkpoint(d)
    assert "\n" not in str(e.value)


def test_generation_config_adds_stop_ids(tmp_path, ckpt, trained):
    d = _copy_ckpt(ckpt, tmp_path)
    n = len(trained)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 1, n + 9]}))
    assert set(Tokenizer.from_checkpoint(d).stop_ids) == {n + 1, n + 2, n + 9}


@pytest.mark.parametrize("gen, extra", [({}, set()), ({"eos_token_id": None}, set()), ({"eos_token_id": []}, set()),
                                       ({"eos_token_id": 9}, {9}), ({"eos_token_id": [1, 9]}, {9})])
def test_generation_config_stop_id_forms(tmp_path, ckpt, trained, gen, extra):
    # an id, a list of ids, null or no key (ids here are offsets from the first special id)
    d = _copy_ckpt(ckpt, tmp_path)
    n = len(trained)
    shifted = {k: (n + v if isinstance(v, int) else [n + x for x in v] if isinstance(v, list) else v)
               for k, v in gen.items()}
    (d / "generation_config.json").write_text(json.dumps(shifted))
    assert set(Tokenizer.from_checkpoint(d).stop_ids) == {n + 1, n + 2} | {n + x for x in extra}


@pytest.mark.parametrize("value", ["[EOS]", [1, "x"], True, [True], {"id": 1}, 1.0])
def test_generation_config_malformed_stop_ids_rejected(tmp_path, ckpt, trained, value):
    # strict, as the converter: a stop id that cannot be read must not be dropped silently (generation would run on)
    d = _copy_ckpt(ckpt, tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(CheckpointError, match="eos_token_id") as e:
        Tokenizer.from_checkpoint(d)
    assert "\n" not in str(e.value)


def test_media_placeholder_mismatch(tmp_path, ckpt, trained):
    d = _copy_ckpt(ckpt, tmp_path)
    (d / "config.json").write_text(json.dumps({"media_placeholder_token_id": len(trained)}))
    with pytest.raises(CheckpointError, match="media_placeholder_token_id"):
        Tokenizer.from_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"media_placeholder_token_id": len(trained) + 21}))
    assert Tokenizer.from_checkpoint(d).media_pad_id == len(trained) + 21
