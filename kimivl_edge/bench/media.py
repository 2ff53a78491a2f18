"""The bench's media section (issue 17), child side: generated inputs (a 10-page US Letter PDF, 16 s of 640x360
video at 10 fps), video decode + sampling speed, PDF page render speed, and the time to first token of a first and a
second question about the same video and PDF. The second turn re-decodes the media but hits the embedding cache and
the KV prefix. Video at ``MediaSettings``' defaults (16 frames of 209 tokens); PDF pages at ``PAGE_PATCHES``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PAGE_PATCHES = 1024   # per PDF page (~270 tokens): ten pages stay a quick smoke run on the tiny preset
QUESTION, FOLLOWUP = "What is shown?", "And a second question?"


def make_inputs(root: Path) -> tuple[Path, Path]:
    """ten.pdf (10 Letter pages, 612x792 points) and video.mp4 (160 frames of 640x360 at 10 fps) under ``root``."""
    import av

    root.mkdir(parents=True, exist_ok=True)
    pdf = root / "ten.pdf"
    pages = [Image.new("RGB", (612, 792), (25 * k, 128, 255 - 25 * k)) for k in range(10)]
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    video = root / "video.mp4"
    with av.open(str(video), "w") as out:
        s = out.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 640, 360, "yuv420p"
        for i in range(160):
            frame = av.VideoFrame.from_ndarray(np.full((360, 640, 3), (i, 128, 255 - i), np.uint8), format="rgb24")
            for packet in s.encode(frame):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return pdf, video


def _turns(model: Any, first: dict) -> dict:
    """The ``first`` question (a video or PDF, then QUESTION) on an empty KV cache, then a second question in the
    same chat."""
    from ..prompt import user_message

    model.decoder.reset()
    history = [first]
    out: dict = {}
    for turn in ("first", "second"):
        t0 = time.perf_counter()
        stream = model.stream_tokens(history, max_tokens=1, temperature=0.0)
        ids = list(stream)
        st = stream.stats
        out[turn] = {"ttft_seconds": time.perf_counter() - t0, "media_seconds": st.media.decode_seconds,
                     "encode_seconds": st.encode_seconds, "prefill_seconds": st.prefill_seconds,
                     "image_tokens": st.image_tokens, "prompt_tokens": st.prompt_tokens,
                     "evaluated_tokens": st.evaluated_tokens}
        history += [{"role": "assistant", "content": model.detokenize(ids) or "."}, user_message(FOLLOWUP)]
    return out


def task_media(t: dict) -> dict:
    from ..media import Geometry, MediaSettings, decode_video, plan_document, plan_video, render_document
    from ..model import KimiVL
    from ..prompt import user_message

    pdf, video = make_inputs(Path(t["workdir"]))
    model = KimiVL.load(t["text"], t["mmproj"], n_ctx=t["n_ctx"], n_threads=t["threads"])
    model.media_settings = settings = MediaSettings(page_patches=t["page_patches"])
    assert model.image_config is not None
    geometry = Geometry(model.image_config, model.max_image_patches)
    res: dict = {"decode_frames_per_s": [], "render_seconds_per_page": []}
    for _ in range(t["runs"]):
        t0 = time.perf_counter()
        frames = decode_video(plan_video(video, settings, geometry))
        res["decode_frames_per_s"].append(len(frames) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        pages = render_document(plan_document(pdf, settings, geometry))
        res["render_seconds_per_page"].append((time.perf_counter() - t0) / len(pages))
    res["frames"], res["pages"] = len(frames), len(pages)
    res["video"] = _turns(model, user_message(QUESTION, videos=[str(video)]))
    res["pdf"] = _turns(model, user_message(QUESTION, documents=[str(pdf)]))
    model.close()
    return res
