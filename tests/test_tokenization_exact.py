"""Exact tokenization of our GGUF files, end to end (docs/model.md §7.1, §8).

What is compared, on ~3 000 generated strings per vocabulary (combining marks of several scripts, emoji with VS16 /
ZWJ / keycaps, digit contractions, CJK, code, whitespace runs, special-token text) and two vocabularies (the tiny
synthetic one, 768 base ranks, and the real-size synthetic one, 163 584 base ranks):

- the runtime (``TextModelInfo.read(gguf).tokenizer`` and ``KimiVL.tokenize`` on a loaded model) against an
  oracle written here: ``tiktoken.Encoding`` built straight from the checkpoint's ``tiktoken.model`` and
  ``tokenizer_config.json`` with the §8 regex typed in from docs/model.md (not the package's PAT_STR);
  ``Tokenizer.from_checkpoint`` must agree too;
- llama.cpp's own tokenizer on the same GGUF (``llama_cpp.Llama(vocab_only=True)``): it may differ only on strings
  that hold a combining mark or a case transition inside a letter run (the documented ``kimi-k2`` splitter
  differences, tests/test_convert_tokenizer.py); any other mismatch fails, and on the large vocabulary both kinds
  must actually occur (else the classification would prove nothing);
- a GGUF whose merges were removed is refused by ``TextModelInfo.read`` and ``KimiVL.load``;
- ``detokenize(tokenize(s)) == s``, and ``StreamDecoder`` fed one id at a time emits, after each id, exactly the
  complete characters received so far (computed here from the token bytes), never U+FFFD.

The large GGUF holds the converter's metadata only (``plan_conversion`` -> no tensors): that is all the tokenizer
path reads, and it keeps this file fast. Run with ``-s`` to see the measured counts.
"""
from __future__ import annotations

import base64
import json
import random
import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import tiktoken

from kimivl_edge.checkpoint import INDEX_FILE, hf_tensor_specs
from kimivl_edge.config import KimiVLConfig
from kimivl_edge.convert import plan_conversion
from kimivl_edge.convert.gguf_out import GGUFPlan, write_gguf
from kimivl_edge.gguf_model import ModelFileError, TextModelInfo
from kimivl_edge.model import KimiVL
from kimivl_edge.safetensors_io import write_safetensors
from kimivl_edge.synth import SPECIAL_TOKEN_OFFSETS, build_vocab, write_tiktoken_model, write_tokenizer_config
from kimivl_edge.tokenizer import N_SPECIAL, StreamDecoder, Tokenizer

LARGE_BASE = 163584  # §8: the real number of base ranks
N_CORPUS = 3000

# §8, the pre-tokenizer regex: eight branches joined with "|", typed in from docs/model.md.
REFERENCE_PATTERN = "|".join([
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
])


# ---------------------------------------------------------------------------------------------------------------
# Oracle


def reference_encoding(ckpt: Path) -> tiktoken.Encoding:
    """tiktoken from the checkpoint's files alone: base64 ranks, specials from added_tokens_decoder (§8, §7.2)."""
    ranks = {}
    for line in (ckpt / "tiktoken.model").read_text(encoding="ascii").splitlines():
        if line.strip():
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    decoder = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"]
    specials = {entry["content"]: int(i) for i, entry in decoder.items()}
    return tiktoken.Encoding("oracle", pat_str=REFERENCE_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def oracle_ids(enc: tiktoken.Encoding, text: str) -> list[int]:
    """§8: special-token strings are split out first, all allowed; nothing is added at the ends."""
    return enc.encode(text, allowed_special="all")


# ---------------------------------------------------------------------------------------------------------------
# Corpus

def _nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


MARKED = {  # combining marks (\p{M}) of several scripts
    "devanagari": ["हिन्दी", "क्षत्रिय", "संस्कृत", "कि", "नमस्ते"],
    "thai": ["ที่", "น้ำ", "กิน", "ภาษาไทย", "สวัสดีครับ"],
    "arabic": ["بِسْمِ", "ٱللَّهِ", "مُحَمَّد", "لَ", "كِتَابٌ"],
    "hebrew": ["שָׁלוֹם", "בְּרֵאשִׁית"],
    "decomposed": [_nfd(w) for w in ("café", "naïve", "Ångström", "résumé", "Tiếng Việt", "Đà Nẵng", "ÉCOLE")]
                  + ["e\u0301", "a\u0300\u0301\u0302", "1\u0301", " \u0301", "\u0301x", "Z\u0335\u0336"],
}
EMOJI = ["❤\ufe0f", "☺\ufe0f", "✔\ufe0f", "👨\u200d👩\u200d👧\u200d👦", "🏳\ufe0f\u200d🌈", "👩🏽\u200d💻",
         "1\ufe0f\u20e3", "#\ufe0f\u20e3", "🇯🇵", "🫠", "😀", "🚀", "👍🏿", "🧑\u200d🤝\u200d🧑"]
CONTRACTIONS = ["42's", "1990's", "9'll", "7'RE", "3'd", "0'm", "5'Ve", "8't", "42'lL", "it's", "WE'LL", "x'S"]
CJK = ["中文", "汉字测试", "混合", "こんにちは", "カタカナ", "한국어", "안녕하세요", "ＡＢＣ１２３", "。、「」",
       "中文English混合", "日本語テキスト", "龍"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "if x == 1:\n\treturn x", '{"key": [1, 2.5, -3e10], "b": null}', "<div class=\"a\">&nbsp;</div>",
        "SELECT * FROM t WHERE id=42;", "#include <stdio.h>\r\nint main(){}", "$ ls -la | grep \"\\.py$\"",
        "fn main() -> i32 {\n    0\n}\n", "λx. x + 1", "a_b-c.d/e\\f", "x += 1  # comment"]
CASE_RUNS = ["getElementById", "XMLHttpRequest", "iPhone", "camelCase", "snake_case", "HTTPServer", "ǅemal",
             "McDonald", "aB", "ПриветМир", "αΒγΔ"]
WHITESPACE = [" ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n\n", "\r\n", " \r\n \r\n", "\u00a0", "\u3000",
              "\u2003", " \n  ", "\n\t", "         "]
WORDS = ["the", "image", "shows", "a", "red", "circle", "There", "are", "What", "Hello", "world", "Привет", "мир",
         "Ελληνικά", "façade", "über", "smörgåsbord", "ABC", "xyz", "ok"]
NUMBERS = ["0", "7", "42", "123", "1234", "12345678901", "3.14159", "-0.5", "1e-9", "100%", "$5.99", "2025-01-31",
           "٣٤٥", "²³", "½", "Ⅻ", "１２３", "0x1F"]
PUNCT = list(".,;:!?-()[]{}<>/\\|@#$%^&*_+=~`\"'") + ["...", "—", "–", "«", "»", "“", "”", "¿", "¡", "•", "→",
                                                      "◁think▷", "◁/think▷"]
SPECIAL_TEXT = ["<|im_end|>", "[EOS]", "[BOS]", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
                "<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>", "[EOT]", "[PAD]", "[UNK]",
                "<|im_end", "[EOS", "<|media_", "<|reserved_token_5|>"]
POOLS = [sum(MARKED.values(), []), EMOJI, CONTRACTIONS, CJK, CODE, CASE_RUNS, WHITESPACE, WORDS, WORDS, NUMBERS,
         PUNCT, SPECIAL_TEXT]
# §7.1, verbatim: one user turn with one image.
CHAT_PROMPT = ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>"
               "<|media_start|>image<|media_content|><|media_pad|><|media_end|>What is the dome building in the "
               "picture?<|im_end|><|im_assistant|>assistant<|im_middle|>")
FIXED = [CHAT_PROMPT, "", " ", "\n", "a" * 300, " " * 40 + "x", "x" + "\n" * 7 + "y", "   \n\n  \t ",
         "42's 1'S 9'll 2'RE 7'd 3'm", "".join(SPECIAL_TEXT), "".join(EMOJI), "".join(sum(MARKED.values(), []))]


def _random_letters(r: random.Random) -> str:
    lo, hi = r.choice([(0x61, 0x7A), (0x41, 0x5A), (0x430, 0x44F), (0x3B1, 0x3C9), (0xE0, 0xFF), (0x5D0, 0x5EA),
                       (0x627, 0x64A), (0x900, 0x97F), (0xE01, 0xE4E), (0x4E00, 0x9FA5), (0xAC00, 0xD7A3)])
    return "".join(chr(r.randint(lo, hi)) for _ in range(r.randint(1, 8)))


def corpus(seed: int = 0, n: int = N_CORPUS) -> list[str]:
    """FIXED plus ``n`` strings of 1-12 pieces (pools above or random code points of 11 scripts), joined by nothing,
    a space or a newline."""
    r = random.Random(seed)
    out = list(FIXED)
    while len(out) < len(FIXED) + n:
        parts = []
        for _ in range(r.randint(1, 12)):
            parts.append(_random_letters(r) if r.random() < 0.15 else r.choice(r.choice(POOLS)))
            parts.append(r.choice(["", "", " ", "\n"]))
        s = "".join(parts)
        assert "\ufffd" not in s
        out.append(s)
    return out


def has_mark(s: str) -> bool:
    """Holds a combining mark (\\p{M}): the regex counts it as a letter, llama.cpp's kimi-k2 splitter does not."""
    return any(unicodedata.category(c)[0] == "M" for c in s)


def _is_han(c: str) -> bool:
    return "CJK UNIFIED IDEOGRAPH" in unicodedata.name(c, "")


def has_case_transition(s: str) -> bool:
    """A non-Han letter of the regex's lower class (Ll, Lm, Lo) directly followed by an upper/title-case letter
    (Lu, Lt): §8 branches 2-3 cut the letter run there, llama.cpp's kimi-k2 splitter keeps it whole."""
    return any(unicodedata.category(x) in ("Ll", "Lm", "Lo") and unicodedata.category(y) in ("Lu", "Lt")
               and not _is_han(x) for x, y in zip(s, s[1:]))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and GGUFs


def large_vocab_checkpoint(src: Path, dst: Path, n_base: int) -> Path:
    """``src`` (a synthetic tiny checkpoint) with a base vocabulary of ``n_base`` ranks (build_vocab), the 256
    specials right after it (§7.2 layout, ids moved in config.json / generation_config.json) and zero weights of
    the new shapes (embedding and lm_head rows follow vocab_size)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != INDEX_FILE:
            shutil.copy(f, dst / f.name)
    write_tiktoken_model(dst / "tiktoken.model", build_vocab(n_base))
    write_tokenizer_config(dst / "tokenizer_config.json", n_base,
                           chat_template=(src / "chat_template.jinja").read_text(encoding="utf-8"))
    ids = {f"{k}_token_id": n_base + SPECIAL_TOKEN_OFFSETS[name]
           for k, name in (("bos", "[BOS]"), ("eos", "[EOS]"), ("pad", "[PAD]"))}
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = cfg["text_config"]["vocab_size"] = n_base + N_SPECIAL
    cfg["media_placeholder_token_id"] = n_base + SPECIAL_TOKEN_OFFSETS["<|media_pad|>"]
    cfg["text_config"].update(ids)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = json.loads((src / "generation_config.json").read_text())
    gen.update({k: v for k, v in ids.items() if k in gen})
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
    specs = hf_tensor_specs(KimiVLConfig.from_dict(cfg))
    shard = "model-00001-of-00001.safetensors"

    def zeros(name, shape, dtype) -> Iterator[np.ndarray]:
        yield np.zeros(int(np.prod(shape)), dtype=np.uint16)  # bf16 bits

    write_safetensors(dst / shard, [(s.name, s.shape, "BF16") for s in specs], zeros)
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {s.name: shard for s in specs}}))
    return dst


def metadata_gguf(ckpt: Path, path: Path, drop: tuple[str, ...] = ()) -> Path:
    """The converter's text-GGUF metadata for ``ckpt`` (minus the keys ``drop``), without tensors."""
    text = plan_conversion(ckpt, "f32", "f32", path.parent).text
    kv = {k: v for k, v in text.kv.items() if k not in drop}
    return write_gguf(path, GGUFPlan(text.arch, kv, [])).path


class Vocab:
    """One vocabulary under test: checkpoint, GGUF, the runtime tokenizer read from it, the oracle, llama.cpp."""

    def __init__(self, name: str, ckpt: Path, gguf_path: Path):
        self.name, self.ckpt, self.gguf = name, ckpt, gguf_path
        self.info = TextModelInfo.read(gguf_path)
        self.runtime = self.info.tokenizer
        self.from_ckpt = Tokenizer.from_checkpoint(ckpt)
        self.oracle = reference_encoding(ckpt)
        self.llama = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)

    def llama_ids(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, converted) -> tuple[Path, Path]:
    """A tiny synthetic checkpoint and its converted F32 text GGUF (a full model llama.cpp can run)."""
    ckpt = tiny_checkpoint("instruct", seed=0)
    return ckpt, converted(ckpt, "f32", "f32")[0]


@pytest.fixture(scope="module")
def vocabs(tiny, tmp_path_factory) -> Iterator[dict[str, Vocab]]:
    root = tmp_path_factory.mktemp("large")
    large = large_vocab_checkpoint(tiny[0], root / "ckpt", LARGE_BASE)
    out = {"tiny": Vocab("tiny", *tiny), "large": Vocab("large", large, metadata_gguf(large, root / "large.gguf"))}
    assert out["tiny"].info.n_vocab == 768 + N_SPECIAL and out["large"].info.n_vocab == LARGE_BASE + N_SPECIAL
    yield out
    for v in out.values():
        v.llama.close()


@pytest.fixture(scope="module")
def model(tiny) -> Iterator[KimiVL]:
    m = KimiVL.load(tiny[1], n_ctx=256, n_threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


# ---------------------------------------------------------------------------------------------------------------
# Corpus coverage (the claims above hold only if the corpus has these)


def test_corpus_covers_the_hard_cases(texts):
    assert len(texts) >= 3000
    for script, words in MARKED.items():
        assert sum(any(w in t for w in words) for t in texts) >= 50, script
    need = {"VS16": "\ufe0f", "ZWJ": "\u200d", "keycap": "\u20e3", "CR LF": "\r\n", "ideographic space": "\u3000",
            "special token": "<|im_end|>", "digit contraction": "42's", "Han": "中文"}
    for what, sub in need.items():
        assert sum(sub in t for t in texts) >= 20, what
    assert sum(has_case_transition(t) for t in texts) >= 300
    assert sum(not has_mark(t) and not has_case_transition(t) for t in texts) >= 800


# ---------------------------------------------------------------------------------------------------------------
# Runtime == tiktoken from the checkpoint files


@pytest.mark.parametrize("which", ["tiny", "large"])
def test_runtime_tokenizer_equals_tiktoken_oracle(vocabs, texts, which):
    v = vocabs[which]
    bad = [t for t in texts if not (v.runtime.encode(t) == oracle_ids(v.oracle, t) == v.from_ckpt.encode(t))]
    assert not bad, f"{which}: {len(bad)}/{len(texts)} differ, e.g. {bad[:3]!r}"
    # special=False: special-token text is plain BPE
    plain = [t for t in texts if "<|" in t or "[E" in t]
    assert plain and all(v.runtime.encode_ordinary(t) == v.oracle.encode_ordinary(t) for t in plain)


def test_loaded_model_tokenize_equals_tiktoken_oracle(vocabs, model, texts):
    oracle = vocabs["tiny"].oracle
    bad = [t for t in texts if model.tokenize(t) != oracle_ids(oracle, t)]
    assert not bad, f"{len(bad)}/{len(texts)} differ, e.g. {bad[:3]!r}"
    assert model.tokenize("<|im_end|>", special=False) == oracle.encode_ordinary("<|im_end|>")
    assert model.tokenize("<|im_end|>") == [oracle.encode_single_token("<|im_end|>")]


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp: differs only where the documented splitter differences explain it


def classify(texts: list[str], v: Vocab) -> dict[str, list[str]]:
    """Strings whose llama.cpp ids differ from the oracle's, by cause."""
    out: dict[str, list[str]] = {"mark": [], "case": [], "unexplained": []}
    for t in texts:
        if v.llama_ids(t) == oracle_ids(v.oracle, t):
            continue
        out["mark" if has_mark(t) else "case" if has_case_transition(t) else "unexplained"].append(t)
    return out


@pytest.mark.parametrize("which", ["tiny", "large"])
def test_llama_cpp_differs_only_by_the_known_splitter_differences(vocabs, texts, which):
    v = vocabs[which]
    c = classify(texts, v)
    print(f"\n{which}: {len(texts)} strings, llama.cpp differs on {len(c['mark'])} with a combining mark, "
          f"{len(c['case'])} with a case transition (no mark), {len(c['unexplained'])} otherwise")
    assert not c["unexplained"], f"{which}: unexplained mismatches, e.g. {c['unexplained'][:3]!r}"
    if which == "large":  # every byte pair is a token here, so both differences must change ids somewhere
        assert c["mark"] and c["case"], "a documented splitter difference never showed: is the classifier vacuous?"


# (string, byte offset of the cut): a case transition, where the §8 regex ends a piece and llama.cpp does not, or
# a combining mark, where llama.cpp ends a piece and the regex does not (hand-derived from the regex).
CASE_CUTS = [("iPad", 1), ("JavaScript", 4), ("jQuery", 1), ("aB", 1)]
MARK_CUTS = [("e\u0301", 1), (_nfd("café"), 4), ("\u0915\u093f", 3), ("\u0628\u0650", 2)]


def _boundaries(enc: tiktoken.Encoding, ids: list[int]) -> set[int]:
    """Byte offsets where one token ends and the next begins."""
    ends = np.cumsum([len(enc.decode_single_token_bytes(i)) for i in ids])
    return set(ends[:-1].tolist())


def test_llama_cpp_splitter_examples(vocabs):
    """On the large vocabulary: the oracle never puts a token across a case cut and always joins a mark to its
    base across the mark cut; llama.cpp's tokens do the opposite there (same bytes, different ids)."""
    v = vocabs["large"]
    for s, cut in CASE_CUTS + MARK_CUTS:
        ours, theirs = oracle_ids(v.oracle, s), v.llama_ids(s)
        assert ours != theirs and v.oracle.decode_bytes(theirs) == s.encode(), s
        want_cut_in_ours = (s, cut) in CASE_CUTS
        assert (cut in _boundaries(v.oracle, ours)) == want_cut_in_ours, (s, ours)
        assert (cut in _boundaries(v.oracle, theirs)) != want_cut_in_ours, (s, theirs)


def test_truncated_gguf_refused(tiny, tmp_path):
    """The header reader refuses a cut-off file with one line, not a struct error."""
    data = tiny[1].read_bytes()
    for n in (0, 3, 100, 5000):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ModelFileError) as e:
            TextModelInfo.read(cut)
        assert "\n" not in str(e.value) and "not a GGUF file" in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# A GGUF without merges is refused


def test_gguf_without_merges_refused(tiny, tmp_path):
    ckpt = tiny[0]
    plan = plan_conversion(ckpt, "f32", "f32", tmp_path).text
    good = write_gguf(tmp_path / "good.gguf", plan).path
    kv = {k: val for k, val in plan.kv.items() if k != "tokenizer.ggml.merges"}
    bad = write_gguf(tmp_path / "nomerges.gguf", GGUFPlan(plan.arch, kv, plan.tensors)).path
    assert TextModelInfo.read(good).n_vocab == 768 + N_SPECIAL  # the same writer with merges is accepted
    for load in (TextModelInfo.read, lambda p: KimiVL.load(p, n_ctx=64, n_threads=1)):
        with pytest.raises(ModelFileError) as e:
            load(bad)
        msg = str(e.value)
        assert "\n" not in msg and "merges" in msg and "nomerges.gguf" in msg and "reconvert" in msg
    # the hazard the refusal guards against: llama.cpp itself loads it and tokenizes byte by byte
    llama = llama_cpp.Llama(str(bad), vocab_only=True, verbose=False)
    try:
        text = "The red circle is on the left of the image."
        assert llama.tokenize(text.encode(), add_bos=False) == list(text.encode())
    finally:
        llama.close()


# ---------------------------------------------------------------------------------------------------------------
# Detokenization


def test_round_trip(vocabs, model, texts):
    for v in vocabs.values():
        bad = [t for t in texts if v.runtime.decode(v.runtime.encode(t)) != t]
        assert not bad, f"{v.name}: {len(bad)} strings do not round-trip, e.g. {bad[:3]!r}"
    bad = [t for t in texts if model.detokenize(model.tokenize(t)) != t]
    assert not bad, f"KimiVL: {len(bad)} strings do not round-trip, e.g. {bad[:3]!r}"


def complete_prefix(data: bytes) -> str:
    """The characters wholly contained in ``data``, a prefix of valid UTF-8 (an incomplete last character of at
    most 3 bytes is left out)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    raise AssertionError(f"not a prefix of valid UTF-8: {data[-8:]!r}")


@pytest.mark.parametrize("which", ["tiny", "large"])
def test_stream_decoder(vocabs, texts, which):
    """One id at a time: after each id the emitted text is exactly the complete characters so far (so a character
    whose bytes straddle tokens appears once its last byte arrives), never U+FFFD; the total is the one-shot
    decode."""
    v = vocabs[which]
    straddling = 0
    for t in texts:
        ids = v.runtime.encode(t)
        parts = [v.oracle.decode_single_token_bytes(i) for i in ids]
        if any(not _valid_utf8(p) for p in parts):
            straddling += 1
        dec, emitted, received = StreamDecoder(v.runtime), "", b""
        for i, p in zip(ids, parts):
            piece = dec.feed(i)
            received += p
            emitted += piece
            assert "\ufffd" not in piece, (t, ids)
            assert emitted == complete_prefix(received), (t, ids)
        emitted += dec.flush()
        assert emitted == v.runtime.decode(ids) == t
    print(f"\n{which}: {straddling}/{len(texts)} strings have a character split across tokens")
    assert straddling >= 500


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
