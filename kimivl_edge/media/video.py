"""Video: which frames to take (metadata only) and decoding them. mp4/webm/mkv/mov through PyAV (wheels carry their
own FFmpeg), seeking to each sampled frame rather than decoding them all; animated GIF/WebP through Pillow. Frames
are evenly spaced over the whole video, first and last included."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import one_line
from ..image import MAX_PIXELS
from .settings import Geometry, MediaSettings
from .source import MediaError, Source, as_source


@dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video become images: frame ``indices`` (0-based, in order), their times in seconds, the
    size each is handed over at and its image tokens; ``source_size`` is the video's own (w, h), the frame that
    grounding answers are mapped to."""

    source: Source
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
    source = as_source(src, "video")
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


def _open_av(source: Source):
    import av

    try:
        container = av.open(str(source.path) if source.path is not None else io.BytesIO(source.data or b""))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{source.name}: not a readable video ({one_line(e)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{source.name}: no video frames (the file has no video stream)")
    return container, container.streams.video[0]


def _probe_av(source: Source) -> tuple[int, float, tuple[int, int]]:
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


def _probe_animated(source: Source) -> tuple[int, float, tuple[int, int]]:
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


def _open_pillow(source: Source) -> Image.Image:
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
