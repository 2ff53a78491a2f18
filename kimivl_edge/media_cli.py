"""The CLI side of video, PDF and grounding (`run --video/--pdf/--ground`, `/video` and `/pdf` in `chat`).

A verb module imports this next to cli_common; it holds the options, the settings they make and the lines printed.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .media import MediaSettings, MediaStats
    from .model import KimiVL


def add_media_args(ap: argparse.ArgumentParser) -> None:
    """Sampling and budget options (defaults: media.MediaSettings)."""
    g = ap.add_argument_group("video and PDF")
    g.add_argument("--fps", type=float, help="video frames sampled per second (default 2)")
    g.add_argument("--frames", type=int, help="sample exactly N frames per video, evenly spaced (first and last)")
    g.add_argument("--max-frames", type=int, help="at most N frames per video (default 16)")
    g.add_argument("--frame-patches", type=int, help="patch cap per frame (default 768; 4 patches = 1 token)")
    g.add_argument("--video-tokens", type=int, help="image-token budget per video (default 4096)")
    g.add_argument("--timestamps", action="store_true", help="write each frame's time ('[1.5s]') before it")
    g.add_argument("--max-pages", type=int, help="at most N pages per PDF (default 16; the rest are dropped, "
                   "and said so)")
    g.add_argument("--page-patches", type=int, help="patch cap per PDF page (default 4096); pages are rendered "
                   "at the DPI that fills it")
    g.add_argument("--doc-tokens", type=int, help="image-token budget per PDF (default 16384)")


def media_settings(args: argparse.Namespace) -> MediaSettings:
    from .media import MediaSettings, with_settings

    return with_settings(MediaSettings(), fps=args.fps, frames=args.frames, max_frames=args.max_frames,
                         frame_patches=args.frame_patches, video_tokens=args.video_tokens,
                         timestamps=args.timestamps or None, max_pages=args.max_pages,
                         page_patches=args.page_patches, document_tokens=args.doc_tokens)


def report(stats: MediaStats, err: TextIO = sys.stderr, verbose: bool = False) -> None:
    """Dropped pages always (one line per document); frames, pages and decode time with ``verbose``."""
    for note in stats.notes:
        err.write(f"note: {note}\n")
    if verbose and (stats.frames or stats.pages):
        err.write(f"video frames {stats.frames}{_frame_tokens(stats.frame_tokens)}, PDF pages {stats.pages} "
                  f"({sum(stats.page_tokens)} tokens), decode/render {stats.decode_seconds:.2f} s\n")


def _frame_tokens(tokens: list[int]) -> str:
    """" (108 tokens each)", or for videos of different sizes " (634 tokens: 108 to 209 per frame)"."""
    if not tokens:
        return ""
    if min(tokens) == max(tokens):
        return f" ({tokens[0]} tokens each)"
    return f" ({sum(tokens)} tokens: {min(tokens)} to {max(tokens)} per frame)"


def print_grounding(answer: str, image: str, draw_to: str | None, out: TextIO = sys.stdout) -> None:
    """The answer's actions in pixels of ``image`` (one line each), and the drawing when asked."""
    from .grounding import describe, draw, parse_actions
    from .image import load_image

    size = load_image(image).size
    actions = parse_actions(answer, [size])
    for a in actions:
        out.write(f"action: {describe(a)}\n")
    if not actions:
        out.write("action: none found in the answer\n")
    if draw_to:
        draw(image, actions, draw_to)
        out.write(f"drawn: {draw_to}\n")


def attach(model: KimiVL, line: str, pending: list[dict], err: TextIO) -> None:
    """Chat's ``/video PATH`` and ``/pdf PATH [PAGES]``: checked now (planned, nothing decoded), sent with the next
    message."""
    from .errors import KimiVLError

    cmd, _, rest = line.partition(" ")
    rest = rest.strip()
    if cmd == "/video":
        part: dict = {"type": "video", "video": rest}
    else:
        head, _, tail = rest.rpartition(" ")
        path, pages = (head, tail) if head and re.fullmatch(r"[\d,-]+", tail) else (rest, "")
        part = {"type": "document", "document": path, **({"pages": pages} if pages else {})}
    try:
        _plan_only(model, part)
    except KimiVLError as e:
        err.write(f"error: {e}\n")
        return
    pending.append(part)
    err.write(f"({cmd[1:]} {rest} attached to the next message)\n")


def with_media(message: dict, parts: list[dict]) -> dict:
    """A user message with ``parts`` (videos, documents) first, then its own content."""
    if not parts:
        return message
    content = message["content"]
    own = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    return {**message, "content": [*parts, *own]}


def _plan_only(model: KimiVL, part: dict) -> None:
    from .errors import UsageError
    from .media import Geometry, plan_document, plan_video

    if model.image_config is None:
        raise UsageError("this model was loaded without an mmproj file: video and documents are not available")
    geo = Geometry(model.image_config, model.max_image_patches)
    if part["type"] == "video":
        plan_video(part["video"], model.media_settings, geo)
    else:
        plan_document(part["document"], model.media_settings, geo, part.get("pages"))
