"""Video and document message parts become image parts, before the prompt is rendered. ``expand_parts`` replaces,
in place and in order,

- ``{"type": "video", "video": PATH|bytes}`` and vLLM's ``{"type": "video_url", "video_url": {"url": URL}}``
  (URL: a ``data:`` URI or a local path) by the sampled frames, each an image part, optionally preceded by a
  timestamp text part ``"[12.5s]"`` (``timestamps``, off by default: the model was not documented to use it);
- ``{"type": "document", "document": PATH|bytes, "pages": "1-20"}`` and OpenAI's ``{"type": "file", "file":
  {"file_data": "data:application/pdf;base64,...", "filename": ...}}`` by its pages, each an image part.

Every part is planned first (metadata only: container headers, page sizes), so every budget is checked before any
frame is decoded or page rendered, and the error says how many tokens are needed, how many are allowed and which
setting to change. Decoded frames and pages are kept in ``DECODED`` (a chat resends the same files every turn).
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..image import ImageProcessorConfig
from .document import DocumentPlan, plan_document, render_document
from .settings import Geometry, MediaSettings
from .source import MediaError, Source
from .video import VideoPlan, decode_video, plan_video


@dataclass
class MediaStats:
    """What the media of one prompt became: frames and pages used, image tokens of each, decode/render time, and
    one note per document whose pages were dropped."""

    frames: int = 0
    frame_tokens: list[int] = field(default_factory=list)   # per frame, all videos in order
    pages: int = 0
    page_tokens: list[int] = field(default_factory=list)    # per page, all documents in order
    decode_seconds: float = 0.0                              # decoding frames + rendering pages (or the cache)
    notes: list[str] = field(default_factory=list)



def _video_source(part: dict) -> Any:
    src = part.get("video", part.get("video_url"))
    if isinstance(src, dict):
        src = src.get("url")
    if src is None:
        raise UsageError("video part holds no video (expected 'video' or 'video_url': {'url': ...})")
    return src


def _document_source(part: dict) -> tuple[Any, str | None]:
    if "document" in part:
        return part["document"], None
    f = part.get("file")
    if not isinstance(f, dict) or "file_data" not in f:
        raise UsageError("file part: only inline 'file_data' (a data URI of a PDF) is supported")
    return f["file_data"], f.get("filename")


def is_video_part(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("video", "video_url") or "video" in part
                                       or "video_url" in part)


def is_document_part(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("document", "file") or "document" in part)


def expand_parts(messages: Sequence[dict], settings: MediaSettings | None = None,
                 image_config: ImageProcessorConfig | None = None, max_patches: int | None = None,
                 context_tokens: int | None = None) -> tuple[list[dict], MediaStats]:
    """``messages`` with every video and document part replaced by image parts (see this module's docstring), and
    what that took. Other parts and messages are passed through untouched (validation is the renderer's).

    Sources are paths, bytes or ``data:`` URIs (the server passes its ``video_url`` / ``file`` parts as they come,
    after checking paths against its ``--media-dir``). ``image_config``/``max_patches`` are the model's image rules
    (``KimiVL.image_config``, ``KimiVL.max_image_patches``); ``context_tokens`` (the model's n_ctx) lets a request
    whose media alone cannot fit fail before anything is decoded. Raises MediaError / UsageError."""
    s = (settings or MediaSettings()).validate()
    plans: dict[tuple[int, int], VideoPlan | DocumentPlan] = {}
    geometry: Geometry | None = None
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, (list, tuple)):
            continue
        for j, part in enumerate(content):
            if not (is_video_part(part) or is_document_part(part)):
                continue
            if geometry is None:
                if image_config is None:
                    raise UsageError("this model was loaded without an mmproj file: video and documents are not "
                                     "available")
                geometry = Geometry(image_config, max_patches)
            if is_video_part(part):
                plans[i, j] = plan_video(_video_source(part), s, geometry)
            else:
                src, name = _document_source(part)
                plans[i, j] = plan_document(src, s, geometry, part.get("pages"), name)
    if not plans:
        return list(messages), MediaStats()
    _check_context(plans.values(), context_tokens)
    return _realize(messages, plans, s)


def _plan_tokens(plan: VideoPlan | DocumentPlan) -> int:
    return plan.total_tokens if isinstance(plan, VideoPlan) else sum(plan.tokens)


def _check_context(plans, context_tokens: int | None) -> None:
    plans = list(plans)
    need = sum(_plan_tokens(p) for p in plans)
    if context_tokens is not None and need >= context_tokens:
        raise MediaError(f"the video/document images need {need} tokens but the context holds {context_tokens}: "
                         f"raise n_ctx (--ctx), or lower max_frames/frame_patches (video) or max_pages/page_patches "
                         "(documents)")


class DecodedCache:
    """The last few videos' frames and documents' pages as decoded, keyed by the file's identity (resolved path,
    mtime and size; a hash for bytes) and what was taken from it (frame indices or pages, and their sizes). A chat
    resends its history every turn: without this, each turn decoded every earlier video and PDF again (0.4-0.9 s).
    Thread-safe; bounded by ``size`` entries (a 16-frame video at the defaults is ~7.5 MB of pixels)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict[tuple, list[Image.Image]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], list[Image.Image]]) -> list[Image.Image]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        images = make()
        with self._lock:
            self._items[key] = images
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return images


DECODED = DecodedCache()


def _identity(source: Source) -> tuple:
    if source.path is not None:
        st = source.path.stat()
        return str(source.path.resolve()), st.st_mtime_ns, st.st_size
    return ("sha1", hashlib.sha1(source.data or b"").hexdigest())


def _decoded(plan: VideoPlan | DocumentPlan) -> list[Image.Image]:
    """The plan's frames or pages, from ``DECODED`` when the same file gave the same selection before."""
    if isinstance(plan, VideoPlan):
        return DECODED.get((_identity(plan.source), "video", plan.indices, plan.size), lambda: decode_video(plan))
    return DECODED.get((_identity(plan.source), "pages", plan.pages, plan.sizes), lambda: render_document(plan))


def _realize(messages: Sequence[dict], plans: dict, s: MediaSettings) -> tuple[list[dict], MediaStats]:
    stats = MediaStats()
    out = []
    t0 = time.perf_counter()
    for i, m in enumerate(messages):
        if not any(k[0] == i for k in plans):
            out.append(m)
            continue
        parts: list[dict] = []
        for j, part in enumerate(m["content"]):
            plan = plans.get((i, j))
            if isinstance(plan, VideoPlan):
                for t, img in zip(plan.times, _decoded(plan)):
                    if s.timestamps:
                        parts.append({"type": "text", "text": f"[{t:.1f}s]"})
                    parts.append({"type": "image", "image": img, "source_size": plan.source_size})
                stats.frames += len(plan.indices)
                stats.frame_tokens += [plan.tokens] * len(plan.indices)
            elif isinstance(plan, DocumentPlan):
                parts += [{"type": "image", "image": img} for img in _decoded(plan)]
                stats.pages += len(plan.pages)
                stats.page_tokens += list(plan.tokens)
                if plan.note:
                    stats.notes.append(plan.note)
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    stats.decode_seconds = time.perf_counter() - t0
    return out, stats
