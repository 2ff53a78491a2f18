"""Reading our text GGUF's metadata: hyper-parameters, the exact tokenizer, chat template, sampling defaults.

The runtime tokenizes itself (tiktoken with the Kimi pattern), not with llama.cpp's splitter, so the vocabulary is
rebuilt from the GGUF: base tokens (GPT-2 byte-to-unicode strings) in id order are the BPE ranks, CONTROL tokens are
the specials by name. A GGUF without merges is refused: llama.cpp would load it and silently tokenize byte by byte.

The file is read with ``gguf_file.GGUFFile`` (gguf-py's ``GGUFReader`` takes 15-25 s on a real-size vocabulary of
163 840 tokens + ~163 000 merges; this parser well under a second). Files come from the internet: before llama.cpp
sees one (``Decoder`` calls ``check_text_gguf``), every key llama.cpp reads is checked for its exact type and for a
range where llama.cpp neither aborts (GGML_ASSERT) nor silently computes garbage, and the vocabulary arrays for what
llama.cpp indexes without checking (tests/test_fuzz.py mutates real files to find what slips through).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFValueType, Keys, TokenType

from .config import TEMPERATURE
from .errors import GGUFFileError, KimiVLError
from .gguf_file import GGUFFile
from .gguf_keys import EdgeKeys
from .tokenizer import Tokenizer, decode_byte_alphabet


class ModelFileError(GGUFFileError):
    """A GGUF that is not (or not a consistent) Kimi-VL file."""


def token_bytes(text: str) -> bytes:
    """A base token's bytes from its GGUF text (GPT-2 byte-to-unicode form)."""
    try:
        return decode_byte_alphabet(text)
    except ValueError as e:
        raise ModelFileError(str(e)) from None


U32, I32, F32, BOOL, STR = (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL,
                            GGUFValueType.STRING)
_INT_MAX = 2**31 - 1  # llama.cpp keeps most sizes in int32 arithmetic
LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS = 512, 1024  # src/llama-hparams.h of the llama.cpp we load with
_ARCH = "deepseek2"
_MAX_TEMPERATURE = 100.0  # a recommended temperature above this is not a sampling default but a damaged file
_SPECIAL_ID_KEYS = (Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID,
                    Keys.Tokenizer.UNK_ID, Keys.Tokenizer.SEP_ID, Keys.Tokenizer.PAD_ID, Keys.Tokenizer.MASK_ID)
_ROPE_SCALING_PREFIX = Keys.Rope.SCALING_TYPE.format(arch=_ARCH).removesuffix("type")  # "deepseek2.rope.scaling."


def _k(template: str) -> str:
    """A per-architecture ``gguf.Keys`` name (``"{arch}.block_count"``) for deepseek2."""
    return template.format(arch=_ARCH)


class _Header:
    """Typed, range-checked reads of a GGUF header. llama.cpp reads a key only in its one exact GGUF type (else it
    refuses the file), but it aborts the process (GGML_ASSERT) or computes garbage on some out-of-range values; so
    every value it or we will use is checked here first, with a one-line ModelFileError."""

    def __init__(self, f: GGUFFile):
        self.f, self.path = f, f.path

    def _get(self, key: str, vtype: GGUFValueType, etype: GGUFValueType | None, required: bool) -> Any:
        if key not in self.f.metadata:
            if required:
                raise ModelFileError(f"{self.path}: missing metadata {key}")
            return None
        got = self.f.types[key]
        if got != (vtype, etype):
            raise ModelFileError(f"{self.path}: metadata {key} is {_type_name(*got)}, expected "
                                 f"{_type_name(vtype, etype)}")
        return self.f.metadata[key]

    def uint(self, key: str, lo: int = 1, hi: int = _INT_MAX, required: bool = True) -> int | None:
        v = self._get(key, U32, None, required)
        if v is not None and not lo <= v <= hi:
            raise ModelFileError(f"{self.path}: metadata {key} = {v} is out of range ({lo}..{hi})")
        return v

    def need(self, key: str, lo: int = 1, hi: int = _INT_MAX) -> int:
        """A required UINT32 value in [lo, hi]."""
        v = self.uint(key, lo, hi)
        assert v is not None
        return v

    def float(self, key: str, lo: float, hi: float, required: bool = True) -> float | None:
        """A finite FLOAT32 value in [lo, hi] (NaN is refused: it passes every comparison llama.cpp makes)."""
        v = self._get(key, F32, None, required)
        if v is not None and not (math.isfinite(v) and lo <= v <= hi):
            raise ModelFileError(f"{self.path}: metadata {key} = {v} is out of range ({lo}..{hi})")
        return v

    def string(self, key: str, required: bool = True) -> str | None:
        return self._get(key, STR, None, required)

    def array(self, key: str, etype: GGUFValueType, required: bool = True) -> Any:
        return self._get(key, GGUFValueType.ARRAY, etype, required)


def _type_name(vtype: GGUFValueType, etype: GGUFValueType | None) -> str:
    return f"an array of {etype.name}" if etype is not None else vtype.name


@dataclass(frozen=True)
class TextHParams:
    n_embd: int
    n_layer: int
    n_ctx_train: int
    n_vocab: int


def check_hparams(h: _Header) -> TextHParams:
    """The ``deepseek2.*`` keys llama.cpp reads for this architecture (llama-model.cpp ``load_hparams``,
    models/deepseek2.cpp), each in its type, in the range where llama.cpp neither aborts nor divides by zero."""
    arch = h.f.metadata.get(Keys.General.ARCHITECTURE)
    if arch != _ARCH:
        raise ModelFileError(f"{h.path}: architecture {arch!r} is not a Kimi-VL text model ({_ARCH})")
    n_layer = h.need(_k(Keys.LLM.BLOCK_COUNT), 1, LLAMA_MAX_LAYERS)
    n_embd = h.need(_k(Keys.LLM.EMBEDDING_LENGTH))
    n_ctx = h.need(_k(Keys.LLM.CONTEXT_LENGTH))
    n_head = h.need(_k(Keys.Attention.HEAD_COUNT))
    h.uint(_k(Keys.Attention.HEAD_COUNT_KV), required=False)
    h.uint(_k(Keys.LLM.FEED_FORWARD_LENGTH))
    h.uint(_k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH))
    h.uint(_k(Keys.Attention.KV_LORA_RANK))
    h.uint(_k(Keys.LLM.EXPERT_SHARED_COUNT), 0)
    h.uint(_k(Keys.Attention.Q_LORA_RANK), 0, 0, required=False)  # Kimi-VL has no q LoRA
    h.uint(_k(Keys.LLM.LEADING_DENSE_BLOCK_COUNT), 0, n_layer, required=False)
    n_expert = h.need(_k(Keys.LLM.EXPERT_COUNT), 1, LLAMA_MAX_EXPERTS)
    h.uint(_k(Keys.LLM.EXPERT_USED_COUNT), 1, n_expert)
    groups = h.uint(_k(Keys.LLM.EXPERT_GROUP_COUNT), 0, n_expert - 1, required=False) or 0
    if groups > 1:
        if n_expert % groups:
            raise ModelFileError(f"{h.path}: {n_expert} experts do not split into {groups} groups")
        h.uint(_k(Keys.LLM.EXPERT_GROUP_USED_COUNT), 1, groups - 1)
    gating = h.uint(_k(Keys.LLM.EXPERT_GATING_FUNC), 0, 3, required=False)
    if gating not in (None, int(ExpertGatingFuncType.SIGMOID)):
        raise ModelFileError(f"{h.path}: expert gating function {gating} is not Kimi-VL's sigmoid")
    _check_head_dims(h, n_embd, n_head)
    h.float(_k(Keys.Attention.LAYERNORM_RMS_EPS), 1e-12, 1.0)
    h.float(_k(Keys.Rope.FREQ_BASE), 1.0, 1e12, required=False)
    h.float(_k(Keys.LLM.EXPERT_WEIGHTS_SCALE), 1e-6, 1e6, required=False)
    h._get(_k(Keys.LLM.EXPERT_WEIGHTS_NORM), BOOL, None, required=False)
    for key in h.f.metadata:
        if key.startswith(_ROPE_SCALING_PREFIX):  # Kimi-VL has none; llama.cpp aborts on an unknown scaling type
            raise ModelFileError(f"{h.path}: unexpected metadata {key} (Kimi-VL has no RoPE scaling)")
    n_vocab = _check_vocab(h)
    h.uint(_k(Keys.LLM.VOCAB_SIZE), n_vocab, n_vocab, required=False)
    return TextHParams(n_embd=n_embd, n_layer=n_layer, n_ctx_train=n_ctx, n_vocab=n_vocab)


def _check_head_dims(h: _Header, n_embd: int, n_head: int) -> None:
    """MLA head sizes: llama.cpp asserts that the no-RoPE part of a query head is at least 1 wide."""
    k_len = h.uint(_k(Keys.Attention.KEY_LENGTH), required=False) or n_embd // n_head
    k_mla = h.uint(_k(Keys.Attention.KEY_LENGTH_MLA), required=False)
    v_mla = h.uint(_k(Keys.Attention.VALUE_LENGTH_MLA), required=False)
    h.uint(_k(Keys.Attention.VALUE_LENGTH), required=False)
    n_rot = h.uint(_k(Keys.Rope.DIMENSION_COUNT), 2, required=False) or k_len
    k_head = k_mla if k_mla and v_mla else k_len
    if n_rot % 2 or n_rot >= k_head:
        raise ModelFileError(f"{h.path}: RoPE dimension {n_rot} must be even and below the key head size {k_head}")


def _check_vocab(h: _Header) -> int:
    """The vocabulary arrays llama.cpp indexes: tokens unique and non-empty (it aborts on a duplicate), token types
    one per token, merges in "left right" form, special ids inside the vocabulary. Returns the vocabulary size."""
    if h.string(Keys.Tokenizer.MODEL) != "gpt2":
        raise ModelFileError(f"{h.path}: no BPE vocabulary (tokenizer.ggml.model is not gpt2)")
    tokens = h.array(Keys.Tokenizer.LIST, STR)
    n = len(tokens)
    if n == 0 or n > _INT_MAX:
        raise ModelFileError(f"{h.path}: tokenizer.ggml.tokens is empty")
    if len(set(tokens)) != n or "" in tokens:
        raise ModelFileError(f"{h.path}: tokenizer.ggml.tokens has an empty or repeated token text")
    for key, etype in ((Keys.Tokenizer.TOKEN_TYPE, I32), (Keys.Tokenizer.SCORES, F32)):
        arr = h.array(key, etype, required=key == Keys.Tokenizer.TOKEN_TYPE)
        if arr is not None and len(arr) != n:
            raise ModelFileError(f"{h.path}: {key} has {len(arr)} entries for {n} tokens")
    merges = h.array(Keys.Tokenizer.MERGES, STR, required=False)
    if not merges:
        raise ModelFileError(f"{h.path}: the vocabulary has no merges (llama.cpp would tokenize byte by byte); "
                             "reconvert it with kimivl-edge convert")
    bad = next((m for m in merges if m.find(" ", 1) in (-1, len(m) - 1)), None)
    if bad is not None:
        raise ModelFileError(f"{h.path}: merge {bad!r} is not two token texts separated by a space")
    for key in _SPECIAL_ID_KEYS:
        h.uint(key, 0, n - 1, required=False)
    return n


def check_tensors(f: GGUFFile, hp: TextHParams) -> None:
    """What the tensor index must agree on with the header (llama.cpp checks each tensor's shape against the
    hyper-parameters itself; these give a clearer message): the embedding and output tables are [n_vocab, n_embd],
    every layer's tensors lie below block_count."""
    for name in ("token_embd.weight", "output.weight"):
        t = f.tensors.get(name)
        if t is None and name == "token_embd.weight":
            raise ModelFileError(f"{f.path}: missing tensor {name}")
        if t is not None and t.ne != (hp.n_embd, hp.n_vocab):
            raise ModelFileError(f"{f.path}: tensor {name} has shape {list(t.shape)}, the header implies "
                                 f"{[hp.n_vocab, hp.n_embd]} (n_vocab, n_embd)")
    for name in f.tensors:
        if name.startswith("blk."):
            layer = name.split(".")[1]
            if not layer.isdigit() or int(layer) >= hp.n_layer:
                raise ModelFileError(f"{f.path}: tensor {name} is outside the {hp.n_layer} layers of the header")


def open_text_gguf(path: str | Path, tensors: bool) -> tuple[GGUFFile, TextHParams]:
    """The text GGUF opened and its header checked as llama.cpp will read it (hyper-parameters, vocabulary arrays),
    with ``tensors`` its tensor index too. Every failure is one line."""
    try:
        f = GGUFFile(path, tensors=tensors)
    except GGUFFileError as e:  # missing, not a GGUF, truncated, ...: the same one line, as a ModelFileError
        raise ModelFileError(str(e)) from None
    try:
        hp = check_hparams(_Header(f))
        if tensors:
            check_tensors(f, hp)
    except BaseException:
        f.close()
        raise
    return f, hp


def check_text_gguf(path: str | Path) -> dict[str, GGMLQuantizationType]:
    """The decoder's guard: a file that passes is one llama.cpp either loads or refuses, never one it crashes on
    (header, vocabulary arrays and tensor index checked). Returns the tensor index's types (name -> ggml type), so
    the decoder does not parse the header again to find what llama.cpp will repack."""
    f, _ = open_text_gguf(path, tensors=True)
    with f:
        return {name: t.type for name, t in f.tensors.items()}


@dataclass(frozen=True)
class TextModelInfo:
    path: Path
    n_embd: int
    n_layer: int
    n_ctx_train: int
    n_vocab: int
    variant: str
    temperature: float
    chat_template: str
    media_placeholder_id: int
    tokenizer: Tokenizer
    tensor_types: dict[str, GGMLQuantizationType]  # with read(tensors=True): what check_text_gguf returns; else {}

    @property
    def is_thinking(self) -> bool:
        return self.variant.startswith("thinking")

    @classmethod
    def read(cls, path: str | Path, tensors: bool = False) -> TextModelInfo:
        """The model's metadata and tokenizer; with ``tensors`` the tensor index checked too, as
        ``check_text_gguf`` does, in the same parse (``KimiVL.load`` hands ``tensor_types`` to the ``Decoder``).
        Without, a vocabulary-only file is fine."""
        path = Path(path)
        f, hp = open_text_gguf(path, tensors=tensors)
        try:
            h = _Header(f)
            tok = _tokenizer(h)
            media = h.uint(EdgeKeys.MEDIA_PLACEHOLDER_TOKEN_ID, 0, hp.n_vocab - 1, required=False)
            if media is not None and media != tok.media_pad_id:
                raise ModelFileError(f"{path}: media placeholder id {media} is not <|media_pad|> "
                                     f"({tok.media_pad_id})")
            variant = h.string(EdgeKeys.VARIANT, required=False) or "instruct"
            if variant not in TEMPERATURE:
                raise ModelFileError(f"{path}: unknown variant {variant!r} (expected one of "
                                     f"{', '.join(TEMPERATURE)})")
            temperature = h.float(Keys.General.SAMPLING_TEMP, 0.0, _MAX_TEMPERATURE, required=False)
            return cls(
                path=path, n_embd=hp.n_embd, n_layer=hp.n_layer, n_ctx_train=hp.n_ctx_train, n_vocab=hp.n_vocab,
                variant=variant, temperature=TEMPERATURE[variant] if temperature is None else temperature,
                chat_template=h.string(Keys.Tokenizer.CHAT_TEMPLATE, required=False) or "",
                media_placeholder_id=tok.media_pad_id, tokenizer=tok,
                tensor_types={name: t.type for name, t in f.tensors.items()} if tensors else {},
            )
        finally:
            f.close()


def _tokenizer(h: _Header) -> Tokenizer:
    """Base tokens (NORMAL, in id order) are the BPE ranks; CONTROL and USER_DEFINED tokens the specials by name."""
    meta, path = h.f.metadata, h.path
    tokens, types = meta[Keys.Tokenizer.LIST], meta[Keys.Tokenizer.TOKEN_TYPE]
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types.tolist())):
        if ty == TokenType.CONTROL or ty == TokenType.USER_DEFINED:
            specials[t] = i
        elif ty == TokenType.NORMAL:
            if len(ranks) != i:
                raise ModelFileError(f"{path}: base token {i} follows a special or unused id")
            b = token_bytes(t)
            if b in ranks:
                raise ModelFileError(f"{path}: base tokens {ranks[b]} and {i} have the same bytes")
            ranks[b] = i
    stops = [meta[k] for k in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID) if k in meta]
    try:
        return Tokenizer(ranks, specials, extra_stop_ids=stops)
    except KimiVLError as e:
        raise ModelFileError(f"{path}: {e}") from None
