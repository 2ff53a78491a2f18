"""What every video and document input starts as: a path, bytes or a ``data:`` URI, checked and named for messages;
and the error raised for media that cannot be used."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import KimiVLError
from ..image import _data_uri_bytes

MediaSource = Union[str, Path, bytes, bytearray, memoryview]


class MediaError(KimiVLError):
    """A video or document that cannot be used (unreadable, encrypted, empty, too large, over a budget)."""



@dataclass(frozen=True)
class Source:
    name: str                  # for messages: the path, or "video bytes" / the file name
    path: Path | None = None
    data: bytes | None = None

    def head(self, n: int = 16) -> bytes:
        if self.data is not None:
            return self.data[:n]
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read(n)


def as_source(src: Any, what: str, name: str | None = None) -> Source:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError(f"{name or what}: empty {what}")
        return Source(name or f"{what} bytes", data=data)
    if isinstance(src, str) and src.startswith("data:"):
        try:
            data = _data_uri_bytes(src)
        except KimiVLError as e:
            raise MediaError(f"{what}: {e}") from None
        return as_source(data, what, name or f"{what} data URI")
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        if not path.is_file():
            raise MediaError(f"{src}: {what} file not found")
        if path.stat().st_size == 0:
            raise MediaError(f"{src}: empty {what} file")
        return Source(str(src), path=path)
    raise MediaError(f"cannot read a {what} from a {type(src).__name__} (expected a path, bytes or data URI)")
