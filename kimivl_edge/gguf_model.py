"""Reading our text GGUF's metadata: hyper-parameters, the exact tokenizer, chat template, sampling defaults.

The runtime tokenizes itself (tiktoken with the Kimi pattern), not with llama.cpp's splitter, so the vocabulary is
rebuilt from the GGUF: base tokens (GPT-2 byte-to-unicode strings) in id order are the BPE ranks, CONTROL tokens are
the specials by name. A GGUF without merges is refused: llama.cpp would load it and silently tokenize byte by byte.

Only the key/value header is read (``read_metadata``, GGUF v2/v3 layout), not the tensor index: gguf-py's
``GGUFReader`` builds numpy views for every element of every string array, which takes 15-25 s for a real-size
vocabulary (163 840 tokens + ~163 000 merges); parsing the header directly takes well under a second.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

from .errors import KimiVLError
from .tokenizer import Tokenizer, decode_byte_alphabet

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class ModelFileError(KimiVLError):
    """A GGUF that is not (or not a consistent) Kimi-VL file."""


def token_bytes(text: str) -> bytes:
    """A base token's bytes from its GGUF text (GPT-2 byte-to-unicode form)."""
    try:
        return decode_byte_alphabet(text)
    except ValueError as e:
        raise ModelFileError(str(e)) from None


# GGUF scalar types -> little-endian struct format (the GGUF spec's value types; arrays hold these or strings).
_SCALAR_FORMAT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class _HeaderCursor:
    """Sequential little-endian reads from a GGUF header (raises ValueError past the end)."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = self.buf[self.pos:end].decode("utf-8")
        self.pos = end
        return s

    def strings(self, count: int) -> list[str]:
        """``count`` consecutive strings (the hot loop of a 163 840-token vocabulary, kept tight)."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        if count > (size - pos) // 8:  # every string takes at least its 8-byte length
            raise ValueError("array longer than the file")
        unpack, out = struct.Struct("<Q").unpack_from, []
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise ValueError("string runs past the end of the file")
            out.append(buf[pos:pos + n].decode("utf-8"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == GGUFValueType.STRING:
                return self.strings(count)
            if etype not in _SCALAR_FORMAT:
                raise ValueError(f"unsupported array element type {etype}")
            dtype = np.dtype(_SCALAR_FORMAT[GGUFValueType(etype)])
            if self.pos + count * dtype.itemsize > len(self.buf):
                raise ValueError("array runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return arr
        if vtype not in _SCALAR_FORMAT:
            raise ValueError(f"unsupported value type {vtype}")
        return self.scalar(_SCALAR_FORMAT[GGUFValueType(vtype)])


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Key -> value of a GGUF file's header (GGUF v2/v3: magic, version, tensor count, key/value count, then the
    key/value pairs); strings as str, string arrays as lists of str, numeric arrays as numpy arrays. The tensor
    index and data are not read. Raises ModelFileError (one line) on anything that is not such a file."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _HeaderCursor(buf)
            if cur.scalar("<I") != GGUF_MAGIC:
                raise ValueError("bad magic")
            version = cur.scalar("<I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            cur.scalar("<Q")  # tensor count
            n_kv = cur.scalar("<Q")
            out: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                out[key] = cur.value(cur.scalar("<I"))
            return out
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as e:
        raise ModelFileError(f"{path}: not a GGUF file ({e.__class__.__name__}: {e})") from None


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
    def read(cls, path: str | Path) -> "TextModelInfo":
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file")
        meta = read_metadata(path)
        arch = meta.get("general.architecture")
        if arch != "deepseek2":
            raise ModelFileError(f"{path}: architecture {arch!r} is not a Kimi-VL text model (deepseek2)")
        if meta.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.tokens" not in meta:
            raise ModelFileError(f"{path}: no BPE vocabulary")
        if len(meta.get("tokenizer.ggml.merges", ())) == 0:
            raise ModelFileError(f"{path}: the vocabulary has no merges (llama.cpp would tokenize byte by byte); "
                                 "reconvert it with kimivl-edge convert")
        tokens = meta.get("tokenizer.ggml.tokens")
        types = np.asarray(meta.get("tokenizer.ggml.token_type", ()), dtype=np.int64)
        ranks: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TOKEN_CONTROL or ty == TOKEN_USER_DEFINED:
                specials[t] = i
            elif ty == TOKEN_NORMAL:
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
        temp_default = 0.8 if variant.startswith("thinking") else 0.2
        missing = [k for k in _REQUIRED_HPARAMS if k not in meta]
        if missing:
            raise ModelFileError(f"{path}: missing metadata {', '.join(missing)}")
        return cls(
            path=path,
            n_embd=int(meta.get("deepseek2.embedding_length")),
            n_layer=int(meta.get("deepseek2.block_count")),
            n_ctx_train=int(meta.get("deepseek2.context_length")),
            n_vocab=len(tokens),
            variant=variant,
            temperature=float(meta.get("general.sampling.temp", temp_default)),
            chat_template=str(meta.get("tokenizer.chat_template", "")),
            media_placeholder_id=media,
            tokenizer=tok,
        )
