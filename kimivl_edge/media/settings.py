"""The rules media are planned under: the user's sampling and budget settings (``MediaSettings``) and the model's
image geometry (``Geometry``: what a w x h image costs)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..errors import UsageError
from ..image import ImageProcessorConfig, grid_hw, num_image_tokens, target_size


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


def with_settings(settings: MediaSettings, **changes: Any) -> MediaSettings:
    """``settings`` with the given fields changed (None values are ignored), validated."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None}).validate()



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
