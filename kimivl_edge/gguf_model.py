"""Reading our text GGUF's metadata: hyper-parameters, the exact tokenizer, chat template, sampling defaults.

The runtime tokenizes itself (tiktoken with the Kimi pattern), not with llama.cpp's splitter, so the vocabulary is
rebuilt from the GGUF: base tokens (GPT-2 byte-to-unicode strings) in id order are the BPE ranks, CONTROL tokens are
the specials by name. A GGUF without merges is refused: llama.cpp would load it and silently tokenize byte by byte.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from .errors import KimiVLError
from .tokenizer import Tokenizer

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class ModelFileError(KimiVLError):
    """A GGUF that is not (or not a consistent) Kimi-VL file."""


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode alphabet (printable bytes map to themselves, the rest to 256 + n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


def token_bytes(text: str) -> bytes:
    u2b = _unicode_to_byte()
    try:
        return bytes(u2b[c] for c in text)
    except KeyError:
        raise ModelFileError(f"token {text!r} is not in GPT-2 byte form") from None


def _field(r: gguf.GGUFReader, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


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
    def read(cls, path: str | Path) -> "TextModelInfo":
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file")
        try:
            r = gguf.GGUFReader(path)
        except Exception as e:  # gguf-py raises ValueError/struct errors on non-GGUF files
            raise ModelFileError(f"{path}: not a GGUF file ({e.__class__.__name__})") from None
        arch = _field(r, "general.architecture")
        if arch != "deepseek2":
            raise ModelFileError(f"{path}: architecture {arch!r} is not a Kimi-VL text model (deepseek2)")
        if _field(r, "tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.tokens" not in r.fields:
            raise ModelFileError(f"{path}: no BPE vocabulary")
        if not _field(r, "tokenizer.ggml.merges"):
            raise ModelFileError(f"{path}: the vocabulary has no merges (llama.cpp would tokenize byte by byte); "
                                 "reconvert it with kimivl-edge convert")
        tokens = _field(r, "tokenizer.ggml.tokens")
        types = np.asarray(r.fields["tokenizer.ggml.token_type"].contents(), dtype=np.int64)
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TOKEN_CONTROL or ty == TOKEN_USER_DEFINED:
                specials[t] = i
            elif ty == TOKEN_NORMAL:
                if len(ranks) != i:
                    raise ModelFileError(f"{path}: base token {i} follows a special or unused id")
                ranks[token_bytes(t)] = i
        eos = _field(r, "tokenizer.ggml.eos_token_id")
        eot = _field(r, "tokenizer.ggml.eot_token_id")
        try:
            tok = Tokenizer(ranks, specials, extra_stop_ids=[int(x) for x in (eos, eot) if x is not None])
        except KimiVLError as e:
            raise ModelFileError(f"{path}: {e}") from None
        media = int(_field(r, "kimivl_edge.media_placeholder_token_id", tok.media_pad_id))
        if media != tok.media_pad_id:
            raise ModelFileError(f"{path}: media placeholder id {media} is not <|media_pad|> ({tok.media_pad_id})")
        variant = str(_field(r, "kimivl_edge.variant", "instruct"))
        temp_default = 0.8 if variant.startswith("thinking") else 0.2
        return cls(
            path=path,
            n_embd=int(_field(r, "deepseek2.embedding_length")),
            n_layer=int(_field(r, "deepseek2.block_count")),
            n_ctx_train=int(_field(r, "deepseek2.context_length")),
            n_vocab=len(tokens),
            variant=variant,
            temperature=float(_field(r, "general.sampling.temp", temp_default)),
            chat_template=str(_field(r, "tokenizer.chat_template", "")),
            media_placeholder_id=media,
            tokenizer=tok,
        )
