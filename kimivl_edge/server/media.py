"""Where images may come from. By default only ``data:`` URIs; ``http(s)://`` with ``--allow-remote-images``; a
local path only with ``--media-dir DIR`` and only inside DIR once symlinks and ``..`` are resolved. ``file://``
and every other scheme are refused. Every image's pixel count is read from its header and checked against the
limit before anything decodes it (the decompression-bomb guard, data URIs included)."""
from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from ..errors import ImageError
from ..image import _data_uri_bytes
from .config import ServerConfig
from .errors import APIError, bad_request


def image_bytes(url: str, cfg: ServerConfig, param: str) -> bytes:
    """The encoded image ``url`` names, after the source policy and the pixel limit."""
    data = _read(url, cfg, param)
    _check_pixels(data, cfg.max_image_pixels, param)
    return data


def _read(url: str, cfg: ServerConfig, param: str) -> bytes:
    if url[:5].lower() == "data:":
        try:
            return _data_uri_bytes(url)
        except ImageError as e:
            raise bad_request(str(e), param) from None
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not cfg.allow_remote_images:
            raise bad_request("http(s) image URLs are disabled (start the server with --allow-remote-images)", param)
        return _fetch(url, cfg, param)
    if scheme == "" and cfg.media_dir is not None:
        return _local(url, cfg.media_dir, cfg.max_body_bytes, param)
    if scheme == "":
        raise bad_request("local image paths are disabled (start the server with --media-dir DIR)", param)
    raise bad_request(f"image URL scheme {scheme!r} is not allowed (data:, http(s) with --allow-remote-images, "
                      "or a path under --media-dir)", param)


def _local(path: str, media_dir: Path, limit: int, param: str) -> bytes:
    root = media_dir.resolve()
    target = (root / path).resolve()  # an absolute path replaces root; symlinks and '..' are resolved
    if not target.is_relative_to(root):
        raise bad_request("image path is outside --media-dir", param)
    try:
        with target.open("rb") as f:
            data = f.read(limit + 1)
    except OSError:
        raise bad_request("image file not found under --media-dir", param) from None
    if len(data) > limit:
        raise APIError(413, "image file is larger than the request body limit", "image_too_large", param)
    return data


_OPENER = urllib.request.OpenerDirector()  # http(s) only, redirects included: no file:, ftp: or data: handlers
for _h in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, urllib.request.HTTPRedirectHandler,
           urllib.request.HTTPErrorProcessor, urllib.request.HTTPDefaultErrorHandler):
    _OPENER.add_handler(_h())


def _fetch(url: str, cfg: ServerConfig, param: str) -> bytes:
    try:
        with _OPENER.open(url, timeout=cfg.remote_timeout) as r:
            data = r.read(cfg.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise bad_request(f"image URL could not be fetched ({type(e).__name__})", param) from None
    if len(data) > cfg.max_body_bytes:
        raise APIError(413, "remote image is larger than the request body limit", "image_too_large", param)
    return data


def _check_pixels(data: bytes, limit: int, param: str) -> None:
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except Exception:  # Pillow raises many types for bad data (its own bomb check included)
        raise bad_request("not a recognised image (or one too large to open)", param) from None
    if w * h > limit:
        raise APIError(413, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {limit} (--max-image-pixels)",
                       "image_too_large", param)
