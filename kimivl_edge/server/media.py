"""Where images, videos and PDFs may come from. By default only ``data:`` URIs; for images, ``http(s)://`` with
``--allow-remote-images``; for images and videos, a local path only with ``--media-dir DIR`` and only inside DIR
once symlinks and ``..`` are resolved. ``file://`` and every other scheme are refused; a PDF (OpenAI's ``file``
part) comes inline only, as ``file_data``. Every image's pixel count is read from its header and checked against
the limit before anything decodes it (the decompression-bomb guard, data URIs included). Videos and PDFs are
checked by the runtime (kimivl_edge.media: frame size, frame and page caps, token budgets) before any frame is
decoded or page rendered."""
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
from .schemas import FileData


def image_bytes(url: str, cfg: ServerConfig, param: str) -> bytes:
    """The encoded image ``url`` names, after the source policy and the pixel limit."""
    data = _read(url, cfg, param, "image")
    _check_pixels(data, cfg.max_image_pixels, param)
    return data


def video_bytes(url: str, cfg: ServerConfig, param: str) -> bytes:
    """The encoded video ``url`` names: a data URI or a path under --media-dir (never fetched from the network)."""
    return _read(url, cfg, param, "video")


def document_bytes(file: FileData, param: str) -> bytes:
    """The PDF of an OpenAI ``file`` part: its inline ``file_data`` data URI (uploaded ``file_id``s do not exist
    here)."""
    if file.file_data is None:
        raise bad_request("file part: only inline 'file_data' (a data:application/pdf;base64,... URI) is supported"
                          + (", not file_id" if file.file_id is not None else ""), param)
    if file.file_data[:5].lower() != "data:":
        raise bad_request("file part: file_data must be a data: URI (data:application/pdf;base64,...)", param)
    return _data(file.file_data, param)


def _data(url: str, param: str) -> bytes:
    try:
        return _data_uri_bytes(url)
    except ImageError as e:
        raise bad_request(str(e), param) from None


def _read(url: str, cfg: ServerConfig, param: str, what: str) -> bytes:
    if url[:5].lower() == "data:":
        return _data(url, param)
    scheme = urlsplit(url).scheme.lower()
    remote = what == "image"  # videos are never fetched: one can be far larger than the body limit allows
    if scheme in ("http", "https") and remote:
        if not cfg.allow_remote_images:
            raise bad_request("http(s) image URLs are disabled (start the server with --allow-remote-images)", param)
        return _fetch(url, cfg, param)
    if scheme == "" and cfg.media_dir is not None:
        return _local(url, cfg.media_dir, cfg.max_body_bytes, param, what)
    if scheme == "":
        raise bad_request(f"local {what} paths are disabled (start the server with --media-dir DIR)", param)
    allowed = "data:, http(s) with --allow-remote-images," if remote else "data:"
    raise bad_request(f"{what} URL scheme {scheme!r} is not allowed ({allowed} or a path under --media-dir)", param)


def _local(path: str, media_dir: Path, limit: int, param: str, what: str) -> bytes:
    root = media_dir.resolve()
    target = (root / path).resolve()  # an absolute path replaces root; symlinks and '..' are resolved
    if not target.is_relative_to(root):
        raise bad_request(f"{what} path is outside --media-dir", param)
    try:
        with target.open("rb") as f:
            data = f.read(limit + 1)
    except OSError:
        raise bad_request(f"{what} file not found under --media-dir", param) from None
    if len(data) > limit:
        raise APIError(413, f"{what} file is larger than the request body limit", f"{what}_too_large", param)
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
