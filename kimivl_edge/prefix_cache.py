"""The persistent prefix cache: the decoder's state after the images of a prompt, on disk, across processes.

A prompt that holds images is prefilled in two steps: up to the end of its last image, then the rest. After the
first step the decoder's per-sequence state (llama.cpp's ``llama_state_seq_get_data``: the KV cells of sequence
0), the positions' keys (token ids and (image key, row)) and the images' embeddings are written to one entry file.
A later prompt, in this process or another, that starts with the same keys restores that entry instead of running
the vision encoder and prefilling the images: a new question about the same picture costs only its own tokens.

Keys are exact: an entry is named by the hash of the *identity* (text GGUF and mmproj identities, llama.cpp's
version, vision backend and the decoder settings that change the state or its numbers) and of the prefix's keys
(image keys are content hashes of the preprocessed pixels). The entry repeats the identity and the keys and ends
with a SHA-256 of its bytes: a corrupt, truncated or foreign entry is ignored, removed and rewritten, with one
warning line. Writes go to a temporary file in the directory, then ``os.replace``: readers and concurrent writers
only ever see whole entries. The directory is bounded by ``max_bytes``, least recently used entries first (an entry's
mtime is its last use). A directory that cannot be written (read-only, full) makes the cache read-only for the
rest of the process, with one warning line; the prompt is then computed as without a cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"KIMIVL-EDGE-PREFIX\x00"
FORMAT = 1
SUFFIX = ".kvc"
DEFAULT_MAX_BYTES = 2 << 30
_STALE_TMP_SECONDS = 3600  # a temporary file this old is left by a killed writer
_SAMPLES, _SAMPLE = 16, 1 << 16  # file identity: sampled chunks

log = logging.getLogger("kimivl_edge.prefix_cache")


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/kimivl-edge``, else ``~/.cache/kimivl-edge``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kimivl-edge"


def file_identity(path: str | Path) -> str:
    """A cheap identity of a (large) file: its size, its first MiB (a GGUF's header and metadata) and 16 chunks of
    64 KiB spread over the rest, hashed. Reads about 2 MiB whatever the file's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(1 << 20))
        for i in range(_SAMPLES):
            f.seek(size * (2 * i + 1) // (2 * _SAMPLES))
            h.update(f.read(_SAMPLE))
        f.seek(max(size - _SAMPLE, 0))
        h.update(f.read(_SAMPLE))
    return h.hexdigest()


def model_identity(text_gguf: str | Path, mmproj_gguf: str | Path | None, vision_backend: str,
                   decoder_state: dict[str, object]) -> str:
    """What a cached state and its embeddings depend on: the two files, llama.cpp's version (the state's format,
    its kernels), the vision backend (the embeddings) and the decoder settings that change the state's layout or
    numbers (KV type, flash attention, context and batch sizes, repacked kernels)."""
    import llama_cpp

    return hashlib.sha256(json.dumps({
        "format": FORMAT, "llama_cpp": llama_cpp.__version__, "text": file_identity(text_gguf),
        "mmproj": None if mmproj_gguf is None else file_identity(mmproj_gguf), "vision": vision_backend,
        "decoder": decoder_state}, sort_keys=True).encode()).hexdigest()


def _jsonable(keys: Sequence[Hashable]) -> list:
    return [list(k) if isinstance(k, tuple) else k for k in keys]


def _from_json(keys: list) -> list[Hashable]:
    return [tuple(k) if isinstance(k, list) else k for k in keys]


@dataclass
class Entry:
    """One cached prefix: the decoder state after ``keys``, and the embeddings of the images in it."""

    keys: list[Hashable]
    state: bytes
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # image key -> [rows, n_embd] float32


class CorruptEntry(Exception):
    """An entry file that is not a whole entry of this format, identity and prefix."""


def _encode(identity: str, entry: Entry) -> bytes:
    embs = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in entry.embeddings.items()}
    head = json.dumps({"format": FORMAT, "identity": identity, "keys": _jsonable(entry.keys),
                       "state_bytes": len(entry.state),
                       "embeddings": [[k, *v.shape] for k, v in embs.items()]}).encode()
    body = b"".join([MAGIC, struct.pack("<Q", len(head)), head, *(v.tobytes() for v in embs.values()), entry.state])
    return body + hashlib.sha256(body).digest()


def _decode(data: bytes, identity: str, keys: list[Hashable]) -> Entry:
    body, digest = data[:-32], data[-32:]
    if len(data) < len(MAGIC) + 40 or not body.startswith(MAGIC):
        raise CorruptEntry("not a prefix cache entry")
    if hashlib.sha256(body).digest() != digest:
        raise CorruptEntry("checksum mismatch (truncated or corrupt)")
    n = struct.unpack_from("<Q", body, len(MAGIC))[0]
    at = len(MAGIC) + 8
    head = json.loads(body[at: at + n])
    at += n
    if head.get("format") != FORMAT or head.get("identity") != identity or _from_json(head.get("keys")) != keys:
        raise CorruptEntry("written for another model, setting or prompt")
    embs = {}
    for key, rows, cols in head["embeddings"]:
        size = rows * cols * 4
        embs[key] = np.frombuffer(body, np.float32, rows * cols, at).reshape(rows, cols).copy()
        at += size
    state = body[at:]
    if len(state) != head["state_bytes"]:
        raise CorruptEntry("state size mismatch")
    return Entry(list(keys), state, embs)


class PrefixCache:
    """Prefix entries in ``directory`` (default ``default_dir()``), at most ``max_bytes`` in total."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        from .errors import check_int

        self.directory = Path(directory) if directory is not None else default_dir()
        self.max_bytes = check_int("max_bytes", max_bytes, 0)
        self.writable = True  # False after a failed write: one warning, then read-only

    def __repr__(self) -> str:
        return f"PrefixCache({str(self.directory)!r}, max_bytes={self.max_bytes})"

    def path(self, identity: str, keys: Sequence[Hashable]) -> Path:
        h = hashlib.sha256(identity.encode() + b"\x00" + json.dumps(_jsonable(keys)).encode()).hexdigest()
        return self.directory / (h[:40] + SUFFIX)

    def contains(self, identity: str, keys: Sequence[Hashable]) -> bool:
        return self.path(identity, keys).is_file()

    def load(self, identity: str, keys: Sequence[Hashable]) -> Entry | None:
        """The entry for exactly ``keys``, or None (absent, unreadable, or corrupt: then removed, one warning)."""
        p = self.path(identity, keys)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("kimivl-edge: prefix cache: cannot read %s (%s); computing instead", p, e.strerror or e)
            return None
        try:
            entry = _decode(data, identity, list(keys))
        except (CorruptEntry, ValueError, KeyError, TypeError, struct.error) as e:
            log.warning("kimivl-edge: prefix cache: ignoring %s (%s); it will be rewritten", p.name, e)
            self._remove(p)
            return None
        self._touch(p)
        return entry

    def reject(self, identity: str, keys: Sequence[Hashable], why: str) -> None:
        """An entry that decoded but that the decoder refused: removed, one warning."""
        p = self.path(identity, keys)
        log.warning("kimivl-edge: prefix cache: ignoring %s (%s); it will be rewritten", p.name, why)
        self._remove(p)

    def store(self, identity: str, entry: Entry) -> bool:
        """Write ``entry`` atomically and keep the directory within ``max_bytes``; False if it was not written."""
        if not self.writable:
            return False
        data = _encode(identity, entry)
        if len(data) > self.max_bytes:
            return False
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(identity, entry.keys))
            tmp = None
        except OSError as e:
            self.writable = False
            log.warning("kimivl-edge: prefix cache: cannot write to %s (%s); not caching in this process",
                        self.directory, e.strerror or e)
            return False
        finally:
            if tmp is not None:
                self._remove(Path(tmp))
        self.prune()
        return True

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        out = []
        for p in self.directory.glob("*" + SUFFIX):
            try:
                out.append((p, p.stat()))
            except OSError:
                pass  # removed by another process meanwhile
        return out

    def total_bytes(self) -> int:
        return sum(st.st_size for p, st in self.entries() if not p.name.startswith(".tmp-"))

    def prune(self) -> None:
        """Remove least recently used entries until the total is within ``max_bytes``, and old temporary files."""
        now = time.time()
        found = []
        for p, st in self.entries():
            if p.name.startswith(".tmp-"):
                if now - st.st_mtime > _STALE_TMP_SECONDS:
                    self._remove(p)
            else:
                found.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in found)
        for _, size, p in sorted(found):
            if total <= self.max_bytes:
                break
            self._remove(p)
            total -= size

    @staticmethod
    def _touch(p: Path) -> None:
        try:
            os.utime(p)
        except OSError:
            pass  # read-only directory, or removed meanwhile: the order of eviction is only a little off

    @staticmethod
    def _remove(p: Path) -> None:
        try:
            p.unlink()
        except OSError:
            pass
