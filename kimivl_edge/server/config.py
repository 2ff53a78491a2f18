"""The server's options: where it listens, who may call it, where images may come from, and its limits."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServerConfig:
    model_id: str                           # the id /v1/models lists and requests must name
    api_key: str | None = None              # Bearer key for every route but /health
    cors_origins: tuple[str, ...] = ()      # no CORS headers unless given
    allow_remote_images: bool = False       # http(s) image URLs
    media_dir: Path | None = None           # local image files, only under this directory
    max_body_bytes: int = 32 << 20
    max_images: int = 8                     # per request
    max_image_pixels: int = 1 << 25         # per image, checked from the header before decoding
    max_queue: int = 64                     # requests waiting behind the running one; past it: 429
    parallel: int = 1                       # chat turns decoded together (batch.BatchRunner) when > 1
    reasoning_format: str = "deepseek"      # "deepseek": thinking in reasoning_content; "none": left in content
    remote_timeout: float = 10.0            # seconds, for --allow-remote-images fetches


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")
