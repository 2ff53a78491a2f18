"""Video and PDF inputs: frames and pages become image parts of the same user message, before the prompt is rendered.

Kimi-VL has no video tokens: a video is a sequence of frames, each an ordinary image (Moonshot's answer in
MoonshotAI/Kimi-VL#24; mlx-vlm and an lmms-eval wrapper do the same), and a document is its pages as images.
Data flows one way: ``source`` (inputs, ``MediaError``) and ``settings`` (budgets, the model's image geometry) are
used by ``video`` (PyAV, animated GIF/WebP) and ``document`` (pypdfium2), which ``expand`` (message parts -> image
parts, the decoded-media cache) drives. This package re-exports the public names.
"""
from .document import DocumentPlan, parse_pages, plan_document, render_document
from .expand import DecodedCache, MediaStats, expand_parts, is_document_part, is_video_part
from .settings import Geometry, MediaSettings, with_settings
from .source import MediaError, MediaSource
from .video import VideoPlan, decode_video, plan_video, sample_indices

__all__ = ["MediaSettings", "MediaStats", "MediaError", "MediaSource", "Geometry", "VideoPlan", "DocumentPlan",
           "DecodedCache", "expand_parts", "plan_video", "decode_video", "plan_document", "render_document",
           "parse_pages", "sample_indices", "with_settings", "is_video_part", "is_document_part"]
