"""Video and PDF inputs: frames and pages become image parts of the same user message, before the prompt is rendered.

Kimi-VL has no video tokens: a video is a sequence of frames, each an ordinary image (Moonshot's answer in
MoonshotAI/Kimi-VL#24; mlx-vlm and an lmms-eval wrapper do the same), and a document is its pages as images.
``expand_parts`` replaces, in place and in order,

- ``{"type": "video", "video": PATH|bytes}`` and vLLM's ``{"type": "video_url", "video_url": {"url": URL}}``
  (URL: a ``data:`` URI or a local path) by the sampled frames, each an image part, optionally preceded by a
  timestamp text part ``"[12.5s]"`` (``timestamps``, off by default: the model was not documented to use it);
- ``{"type": "document", "document": PATH|bytes, "pages": "1-20"}`` and OpenAI's ``{"type": "file", "file":
  {"file_data": "data:application/pdf;base64,...", "filename": ...}}`` by its pages, each an image part.

Planning reads only metadata (container headers, page sizes), so every budget is checked before any frame is
decoded or page rendered, and the error says how many tokens are needed, how many are allowed and which setting to
change. Video: mp4/webm/mkv/mov through PyAV (wheels carry their own FFmpeg), seeking to each sampled frame rather
than decoding them all; animated GIF/WebP through Pillow. Frames are evenly spaced over the whole video, first and
last included. PDF: pypdfium2; each page is rendered at the scale that fills its own patch budget, so no page is
rendered large and then shrunk by the processor (docs/model.md §4.2).
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from PIL import Image

from .errors import KimiVLError, UsageError, one_line
from .image import MAX_PIXELS, ImageProcessorConfig, _data_uri_bytes, grid_hw, num_image_tokens, target_size

MediaSource = Union[str, Path, bytes, bytearray, memoryview]


class MediaError(KimiVLError):
    """A video or document that cannot be used (unreadable, encrypted, empty, too large, over a budget)."""


@dataclass(frozen=True)
class MediaSettings:
    """How videos and documents become images. Defaults keep a laptop responsive (README "Video and PDF"): a video
    is at most 16 frames at 2 fps (mlx-vlm's defaults), each capped at 768 patches (~192 tokens, about a 480-pixel
    long side as lmms-eval's wrapper uses), 4096 image tokens in all; a document is at most 16 pages, each rendered
    to the model's own 4096-patch budget (~1024 tokens), 16384 image tokens in all."""

    fps: float = 2.0                # frames per second of video to sample (ignored when ``frames`` is set)
    frames: int | None = None       # sample exactly this many frames (at most max_frames)
    max_frames: int = 16
    frame_patches: int = 768        # per-frame patch cap (4 patches = 1 token)
    video_tokens: int = 4096        # image-token budget of one video
    timestamps: bool = False        # "[t s]" text before each frame
    max_pages: int = 16
    page_patches: int = 4096        # per-page patch cap
    document_tokens: int = 16384    # image-token budget of one document

    def validate(self) -> MediaSettings:
        for name in ("max_frames", "frame_patches", "video_tokens", "max_pages", "page_patches", "document_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name} must be a positive integer, got {v!r}")
        if self.frame_patches < 4 or self.page_patches < 4:
            raise UsageError("frame_patches and page_patches must be >= 4 (one token)")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise UsageError(f"fps must be a positive number, got {self.fps!r}")
        if self.frames is not None:
            if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
                raise UsageError(f"frames must be a positive integer, got {self.frames!r}")
            if self.frames > self.max_frames:
                raise UsageError(f"frames {self.frames} exceeds max_frames {self.max_frames}: raise max_frames")
        return self


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


@dataclass(frozen=True)
class Geometry:
    """The model's image rules: what a w x h image costs (docs/model.md §4) under a per-image cap."""

    config: ImageProcessorConfig
    max_patches: int | None = None   # the model's own cap (KimiVL.max_image_patches)

    def fit(self, w: int, h: int, cap: int) -> tuple[tuple[int, int], int]:
        """The size to hand over for a w x h image capped at ``cap`` patches, and its image tokens as the model
        will count them (the model then applies its own cap, exactly as here)."""
        size = target_size(w, h, self.config, cap)
        grid = grid_hw(size[0], size[1], self.config, self.max_patches)
        return size, num_image_tokens(grid, self.config.merge_kernel_size)


# ---------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class _Source:
    name: str                  # for messages: the path, or "video bytes" / the file name
    path: Path | None = None
    data: bytes | None = None

    def head(self, n: int = 16) -> bytes:
        if self.data is not None:
            return self.data[:n]
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read(n)


def _source(src: Any, what: str, name: str | None = None) -> _Source:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError(f"{name or what}: empty {what}")
        return _Source(name or f"{what} bytes", data=data)
    if isinstance(src, str) and src.startswith("data:"):
        try:
            data = _data_uri_bytes(src)
        except KimiVLError as e:
            raise MediaError(f"{what}: {e}") from None
        return _source(data, what, name or f"{what} data URI")
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        if not path.is_file():
            raise MediaError(f"{src}: {what} file not found")
        if path.stat().st_size == 0:
            raise MediaError(f"{src}: empty {what} file")
        return _Source(str(src), path=path)
    raise MediaError(f"cannot read a {what} from a {type(src).__name__} (expected a path, bytes or data URI)")


# ---------------------------------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video become images: frame ``indices`` (0-based, in order), their times in seconds, the
    size each is handed over at and its image tokens; ``source_size`` is the video's own (w, h), the frame that
    grounding answers are mapped to."""

    source: _Source
    n_frames: int
    indices: tuple[int, ...]
    times: tuple[float, ...]
    size: tuple[int, int]
    tokens: int
    fps: float
    animated_image: bool   # GIF/WebP (Pillow) rather than a video container (PyAV)
    source_size: tuple[int, int] = (0, 0)

    @property
    def total_tokens(self) -> int:
        return self.tokens * len(self.indices)


def _is_animated_image(head: bytes) -> bool:
    return head[:6] in (b"GIF87a", b"GIF89a") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def sample_indices(n_frames: int, n: int) -> list[int]:
    """``n`` frame indices evenly spaced over 0 .. n_frames - 1, first and last included (n = 1: the first);
    halves round up."""
    if n <= 1:
        return [0]
    return [(2 * i * (n_frames - 1) + n - 1) // (2 * (n - 1)) for i in range(n)]


def _frame_count_to_sample(n_frames: int, duration: float, s: MediaSettings) -> int:
    n = s.frames if s.frames is not None else max(1, math.ceil(duration * s.fps))
    return max(1, min(n, s.max_frames, n_frames))


def plan_video(src: Any, settings: MediaSettings, geometry: Geometry) -> VideoPlan:
    """Metadata only: frame count, rate and size -> the frames to take and what they cost. Raises MediaError for
    unreadable, empty or oversized videos and when the frames exceed ``video_tokens``."""
    source = _source(src, "video")
    animated = _is_animated_image(source.head())
    n_frames, fps, (w, h) = (_probe_animated if animated else _probe_av)(source)
    if n_frames < 1:
        raise MediaError(f"{source.name}: the video has no frames")
    if w * h > MAX_PIXELS:
        raise MediaError(f"{source.name}: {w}x{h} frames exceed the limit of {MAX_PIXELS} pixels")
    n = _frame_count_to_sample(n_frames, n_frames / fps, settings)
    indices = tuple(sample_indices(n_frames, n))
    size, tokens = geometry.fit(w, h, settings.frame_patches)
    plan = VideoPlan(source, n_frames, indices, tuple(i / fps for i in indices), size, tokens, fps, animated,
                     (w, h))
    if plan.total_tokens > settings.video_tokens:
        raise MediaError(f"{source.name}: {n} frames x {tokens} tokens = {plan.total_tokens} image tokens, over the "
                         f"video budget of {settings.video_tokens}: lower max_frames (--max-frames) or "
                         f"frame_patches (--frame-patches), or raise video_tokens (--video-tokens)")
    return plan


def _open_av(source: _Source):
    import av

    try:
        container = av.open(str(source.path) if source.path is not None else io.BytesIO(source.data or b""))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{source.name}: not a readable video ({one_line(e)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{source.name}: no video frames (the file has no video stream)")
    return container, container.streams.video[0]


def _probe_av(source: _Source) -> tuple[int, float, tuple[int, int]]:
    """(frame count, frames per second, (w, h)) from the container's headers."""
    container, stream = _open_av(source)
    try:
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        w, h = stream.codec_context.width, stream.codec_context.height
        n = stream.frames
        if not n and rate > 0:  # webm/mkv carry no frame count: the duration says it
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = (container.duration or 0) / 1e6
            n = round(seconds * rate)
    finally:
        container.close()
    if rate <= 0 or not w or not h:
        raise MediaError(f"{source.name}: the video stream has no frame rate or size")
    return int(n), rate, (w, h)


def _probe_animated(source: _Source) -> tuple[int, float, tuple[int, int]]:
    """(frame count, mean frames per second, (w, h)) of an animated GIF/WebP; frame durations in ms are read from
    every frame (Pillow has no index of them)."""
    with _open_pillow(source) as im:
        n = getattr(im, "n_frames", 1)
        total_ms = 0.0
        try:
            for i in range(n):
                im.seek(i)
                total_ms += float(im.info.get("duration") or 100)  # browsers' 100 ms for a missing delay
        except (OSError, EOFError, ValueError) as e:
            raise MediaError(f"{source.name}: animated image could not be decoded ({one_line(e)})") from None
        return n, n / (total_ms / 1000), im.size


def _open_pillow(source: _Source) -> Image.Image:
    try:
        im = Image.open(source.path if source.path is not None else io.BytesIO(source.data or b""))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{source.name}: the frames exceed the limit of {MAX_PIXELS} pixels ({one_line(e)})") from None
    except Exception as e:  # Pillow raises many types for corrupt data
        raise MediaError(f"{source.name}: not a readable animated image ({one_line(e)})") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise MediaError(f"{source.name}: {w}x{h} frames exceed the limit of {MAX_PIXELS} pixels")
    return im


def decode_video(plan: VideoPlan) -> list[Image.Image]:
    """The planned frames as RGB images at ``plan.size``, in order."""
    frames = _decode_animated(plan) if plan.animated_image else _decode_av(plan)
    return [f.convert("RGB").resize(plan.size, Image.Resampling.BICUBIC) if f.size != plan.size
            else f.convert("RGB") for f in frames]


def _decode_animated(plan: VideoPlan) -> list[Image.Image]:
    out = []
    with _open_pillow(plan.source) as im:
        try:
            for i in plan.indices:
                im.seek(i)
                out.append(im.convert("RGB"))
        except (OSError, EOFError, ValueError) as e:
            raise MediaError(f"{plan.source.name}: frame {i} could not be decoded ({one_line(e)})") from None
    return out


def _decode_av(plan: VideoPlan) -> list[Image.Image]:
    """Seek to each planned frame (to the keyframe before it, then decode forward to it); a stream that cannot seek
    is decoded once from the start, keeping the planned frames."""
    import av

    container, stream = _open_av(plan.source)
    stream.thread_type = "AUTO"
    try:
        try:
            return [_frame_at(container, stream, t, plan) for t in plan.times]
        except _CannotSeek:
            container.close()
            container, stream = _open_av(plan.source)
            return _decode_sequential(container, stream, plan)
    except av.FFmpegError as e:
        raise MediaError(f"{plan.source.name}: the video could not be decoded ({one_line(e)})") from None
    finally:
        container.close()


class _CannotSeek(Exception):
    pass


def _frame_time(frame, stream) -> float | None:
    if frame.pts is None or stream.time_base is None:
        return None
    start = stream.start_time or 0
    return float((frame.pts - start) * stream.time_base)


def _frame_at(container, stream, t: float, plan: VideoPlan) -> Image.Image:
    """The first frame at or after ``t`` seconds (within half a frame)."""
    import av

    start = stream.start_time or 0
    try:
        container.seek(start + int(t / float(stream.time_base)), stream=stream, backward=True, any_frame=False)
    except (av.FFmpegError, ValueError):
        raise _CannotSeek() from None
    last = None
    for frame in container.decode(stream):
        ft = _frame_time(frame, stream)
        if ft is None:
            raise _CannotSeek()
        last = frame
        if ft >= t - 0.5 / plan.fps:
            return frame.to_image()
    if last is not None and t >= plan.times[-1]:
        return last.to_image()  # the last frame's time was estimated from the duration
    raise MediaError(f"{plan.source.name}: the video ends before {t:.2f} s (frame {round(t * plan.fps)} of "
                     f"{plan.n_frames} in its header): truncated?")


def _decode_sequential(container, stream, plan: VideoPlan) -> list[Image.Image]:
    wanted = set(plan.indices)
    got: dict[int, Image.Image] = {}
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            got[i] = frame.to_image()
        if i >= plan.indices[-1]:
            break
    missing = [i for i in plan.indices if i not in got]
    if missing:
        raise MediaError(f"{plan.source.name}: the video ends before frame {missing[0]} of {plan.n_frames} in its "
                         "header: truncated?")
    return [got[i] for i in plan.indices]


# ---------------------------------------------------------------------------------------------------------------
# PDF


@dataclass(frozen=True)
class DocumentPlan:
    """Which pages of a PDF become images: 1-based ``pages``, the scale (pixels per point) and size each is
    rendered at, its image tokens, and a note naming the dropped pages ("" when none)."""

    source: _Source
    n_pages: int
    pages: tuple[int, ...]
    scales: tuple[float, ...]
    sizes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]
    note: str


def parse_pages(spec: str | None, n_pages: int) -> list[int]:
    """1-based pages of "1-3,5,9-" (open ends allowed; order kept, duplicates dropped); None means all. Ranges are
    clipped to the document; a page or range starting past its end is an error."""
    if spec is None or not str(spec).strip():
        return list(range(1, n_pages + 1))
    out: list[int] = []
    for item in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d*)\s*(-?)\s*(\d*)\s*", item)
        if not m or not (m.group(1) or m.group(3)) or (not m.group(2) and not m.group(1)):
            raise UsageError(f"pages {spec!r}: {item.strip()!r} is not a page or a range like 3-7")
        first = int(m.group(1)) if m.group(1) else 1
        last = (int(m.group(3)) if m.group(3) else n_pages) if m.group(2) else first
        if first < 1 or last < first:
            raise UsageError(f"pages {spec!r}: {item.strip()!r} is not a valid range (pages count from 1)")
        if first > n_pages:
            raise UsageError(f"pages {spec!r}: page {first} does not exist (the document has {n_pages} pages)")
        out += [p for p in range(first, min(last, n_pages) + 1) if p not in out]
    return out


def _ranges(pages: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out, i = [], 0
    while i < len(pages):
        j = i
        while j + 1 < len(pages) and pages[j + 1] == pages[j] + 1:
            j += 1
        out.append(str(pages[i]) if i == j else f"{pages[i]}-{pages[j]}")
        i = j + 1
    return ", ".join(out)


def _open_pdf(source: _Source):
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(source.path if source.path is not None else source.data)
    except pdfium.PdfiumError as e:
        if "password" in str(e).lower():
            raise MediaError(f"{source.name}: the PDF is password-protected (decrypt it first)") from None
        # PDFium also refuses a PDF with an empty page tree, as "Data format error"
        raise MediaError(f"{source.name}: not a readable PDF, or one without pages ({one_line(e)})") from None
    if len(pdf) == 0:
        pdf.close()
        raise MediaError(f"{source.name}: the PDF has no pages")
    return pdf


def _page_scale(w_pt: float, h_pt: float, cap: int) -> float:
    """Pixels per point that make a w_pt x h_pt page about ``cap`` patches (14x14 pixels each)."""
    return math.sqrt(cap * 196 / (w_pt * h_pt))


def _render_size(w_pt: float, h_pt: float, scale: float) -> tuple[int, int]:
    """pypdfium2's bitmap size for a page at ``scale`` (``PdfPage.render``: ceil(side * scale))."""
    return max(1, math.ceil(w_pt * scale)), max(1, math.ceil(h_pt * scale))


def plan_document(src: Any, settings: MediaSettings, geometry: Geometry, pages: str | None = None,
                  name: str | None = None) -> DocumentPlan:
    """Page sizes only: the pages to render (``pages`` ranges, then ``max_pages``, then ``document_tokens``, in
    page order), their scales and costs. Raises MediaError for encrypted, broken or empty PDFs."""
    source = _source(src, "document", name)
    pdf = _open_pdf(source)
    try:
        n_pages = len(pdf)
        wanted = parse_pages(pages, n_pages)
        sizes_pt = [pdf.get_page_size(p - 1) for p in wanted[:settings.max_pages]]
    finally:
        pdf.close()
    costed = []
    for p, (w_pt, h_pt) in zip(wanted, sizes_pt):
        if w_pt <= 0 or h_pt <= 0:
            raise MediaError(f"{source.name}: page {p} has no area ({w_pt}x{h_pt} points)")
        scale = _page_scale(w_pt, h_pt, settings.page_patches)
        costed.append((p, scale, *geometry.fit(*_render_size(w_pt, h_pt, scale), settings.page_patches)))
    kept, total = 0, 0
    while kept < len(costed) and total + costed[kept][3] <= settings.document_tokens:
        total += costed[kept][3]
        kept += 1
    if not kept:
        raise MediaError(f"{source.name}: page {wanted[0]} alone needs {costed[0][3]} image tokens, over the "
                         f"document budget of {settings.document_tokens}: raise document_tokens (--doc-tokens) or "
                         "lower page_patches (--page-patches)")
    over_budget = [c[0] for c in costed[kept:]]
    drops = []
    if len(wanted) > settings.max_pages:
        drops.append(f"pages {_ranges(wanted[settings.max_pages:])} dropped (max_pages {settings.max_pages}, "
                     "--max-pages)")
    if over_budget:
        drops.append(f"pages {_ranges(over_budget)} dropped (document_tokens {settings.document_tokens}, "
                     "--doc-tokens)")
    note = f"{source.name}: " + "; ".join(drops) if drops else ""
    use = costed[:kept]
    return DocumentPlan(source, n_pages, tuple(c[0] for c in use), tuple(c[1] for c in use),
                        tuple(c[2] for c in use), tuple(c[3] for c in use), note)


def render_document(plan: DocumentPlan) -> list[Image.Image]:
    """The planned pages as RGB images at their planned sizes, in order."""
    import pypdfium2 as pdfium

    pdf = _open_pdf(plan.source)
    out = []
    try:
        for p, scale, size in zip(plan.pages, plan.scales, plan.sizes):
            page = pdf[p - 1]
            try:
                img = page.render(scale=scale).to_pil().convert("RGB")
            finally:
                page.close()
            out.append(img if img.size == size else img.resize(size, Image.Resampling.BICUBIC))
    except pdfium.PdfiumError as e:
        raise MediaError(f"{plan.source.name}: page could not be rendered ({one_line(e)})") from None
    finally:
        pdf.close()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Parts


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
    """``messages`` with every video and document part replaced by image parts (see the module docstring), and
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


def _identity(source: _Source) -> tuple:
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


def with_settings(settings: MediaSettings, **changes: Any) -> MediaSettings:
    """``settings`` with the given fields changed (None values are ignored), validated."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None}).validate()


__all__ = ["MediaSettings", "MediaStats", "MediaError", "Geometry", "VideoPlan", "DocumentPlan", "expand_parts",
           "plan_video", "decode_video", "plan_document", "render_document", "parse_pages", "sample_indices",
           "with_settings", "is_video_part", "is_document_part"]
