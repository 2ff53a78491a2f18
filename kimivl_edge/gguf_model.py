"""Reading our text GGUF's metadata: hyper-parameters, the exact tokenizer, chat template, sampling defaults.

The runtime tokenizes itself (tiktoken with the Kimi pattern), not with llama.cpp's splitter, so the vocabulary is
rebuilt from the GGUF: base tokens (GPT-2 byte-to-unicode strings) in id order are the BPE ranks, CONTROL tokens are
the specials by name. A GGUF without merges is refused: llama.cpp would load it and silently tokenize byte by byte.

Only the key/value header is read (``gguf_file.read_metadata``), not the tensor index: gguf-py's ``GGUFReader``
takes 15-25 s on a real-size vocabulary (163 840 tokens + ~163 000 merges), the header parser well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import TokenType

from .config import TEMPERATURE
from .errors import GGUFFileError, KimiVLError
from .gguf_file import read_metadata
from .tokenizer import Tokenizer, decode_byte_alphabet


class ModelFileError(GGUFFileError):
    """A GGUF that is not (or not a consistent) Kimi-VL file."""


def token_bytes(text: str) -> bytes:
    """A base token's bytes from its GGUF text (GPT-2 byte-to-unicode form)."""
    try:
        return decode_byte_alphabet(text)
    except ValueError as e:
        raise ModelFileError(str(e)) from None


_REQUIRED_HPARAMS = ("deepseek2.embedding_length", "deepseek2.block_count", "deepseek2.context_length")


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

    @property
    def is_thinking(self) -> bool:
        return self.variant.startswith("thinking")

    @classmethod
    def read(cls, path: str | Path) -> TextModelInfo:
        path = Path(path)
        try:
            meta = read_metadata(path)
        except GGUFFileError as e:  # missing, not a GGUF, truncated, ...: the same one line, as a ModelFileError
            raise ModelFileError(str(e)) from None
        arch = meta.get("general.architecture")
        if arch != "deepseek2":
            raise ModelFileError(f"{path}: architecture {arch!r} is not a Kimi-VL text model (deepseek2)")
        if meta.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.tokens" not in meta:
            raise ModelFileError(f"{path}: no BPE vocabulary")
        if len(meta.get("tokenizer.ggml.merges", ())) == 0:
            raise ModelFileError(f"{path}: the vocabulary has no merges (llama.cpp would tokenize byte by byte); "
                                 "reconvert it with kimivl-edge convert")
        missing = [k for k in _REQUIRED_HPARAMS if k not in meta]
        if missing:
            raise ModelFileError(f"{path}: missing metadata {', '.join(missing)}")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise ModelFileError(f"{path}: no tokenizer.ggml.tokens list")
        types = np.asarray(meta.get("tokenizer.ggml.token_type", ()), dtype=np.int64)
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TokenType.CONTROL or ty == TokenType.USER_DEFINED:
                specials[t] = i
            elif ty == TokenType.NORMAL:
                if len(ranks) != i:
                    raise ModelFileError(f"{path}: base token {i} follows a special or unused id")
                ranks[token_bytes(t)] = i
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        try:
            tok = Tokenizer(ranks, specials, extra_stop_ids=[int(x) for x in (eos, eot) if x is not None])
        except KimiVLError as e:
            raise ModelFileError(f"{path}: {e}") from None
        media = int(meta.get("kimivl_edge.media_placeholder_token_id", tok.media_pad_id))
        if media != tok.media_pad_id:
            raise ModelFileError(f"{path}: media placeholder id {media} is not <|media_pad|> ({tok.media_pad_id})")
        variant = str(meta.get("kimivl_edge.variant", "instruct"))
        temp_default = TEMPERATURE.get(variant, TEMPERATURE["instruct"])
        return cls(
            path=path,
            n_embd=int(meta["deepseek2.embedding_length"]),
            n_layer=int(meta["deepseek2.block_count"]),
            n_ctx_train=int(meta["deepseek2.context_length"]),
            n_vocab=len(tokens),
            variant=variant,
            temperature=float(meta.get("general.sampling.temp", temp_default)),
            chat_template=str(meta.get("tokenizer.chat_template", "")),
            media_placeholder_id=media,
            tokenizer=tok,
        )
