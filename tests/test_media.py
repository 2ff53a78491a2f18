"""Video and PDF inputs: fixtures made here (PyAV-encoded videos, Pillow GIF/WebP, Pillow-written PDFs) whose
frames and pages carry their own number as six black/white bands (bit b of the number = band b, left to right:
robust to lossy codecs), so selection, sizes, token counts and order are checked
against known content. Expected sizes and token counts are worked out by hand from docs/model.md §4 in comments.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image

from kimivl_edge.errors import KimiVLError, UsageError
from kimivl_edge.image import ImageProcessorConfig
from kimivl_edge.media import (Geometry, MediaError, MediaSettings, expand_parts, parse_pages, plan_document,
                               plan_video, sample_indices)
from shared import run_cli

CFG = ImageProcessorConfig(patch_size=14, merge_kernel_size=(2, 2), in_token_limit=4096,
                           image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), pad_input=True)
GEO = Geometry(CFG)


def pattern(i: int, size: tuple[int, int]) -> np.ndarray:
    """[h, w, 3] uint8: band b (of 6, left to right) white when bit b of ``i`` is set, else black."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    for b in range(6):
        if i >> b & 1:
            a[:, b * w // 6:(b + 1) * w // 6] = 255
    return a


def read_bands(a: np.ndarray) -> int:
    """The number in an [h, w(, 3)] array of the pattern: the middle third of each band, thresholded."""
    grey = a.mean(axis=2) if a.ndim == 3 else a
    w = grey.shape[1]
    bits = [grey[:, (6 * b + 2) * w // 36:(6 * b + 4) * w // 36].mean() > 127 for b in range(6)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def number(img: Image.Image) -> int:
    return read_bands(np.asarray(img.convert("RGB"), dtype=np.float32))


def picture(i: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(pattern(i, size))


def write_video(path: Path, n: int, fps: int = 10, size: tuple[int, int] = (320, 240), codec: str = "mpeg4",
                gop: int | None = None) -> Path:
    """n frames, frame i showing the number i mod 64; ``gop``: a keyframe every ``gop`` frames."""
    w, h = size
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height = w, h
        if gop is not None:
            s.codec_context.gop_size = gop
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "mpeg4":
            s.options = {"qscale": "2"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(pattern(i, size), format="rgb24")
            for packet in s.encode(frame):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "forty.mp4", 40)
    write_video(root / "wide.mp4", 3, size=(640, 360))
    return root


# ---------------------------------------------------------------------------------------------------------------
# Video: selection


def test_evenly_spaced_indices_include_first_and_last():
    assert sample_indices(40, 8) == [0, 6, 11, 17, 22, 28, 33, 39]   # 39 i / 7, halves up
    assert sample_indices(40, 4) == [0, 13, 26, 39]
    assert sample_indices(40, 5) == [0, 10, 20, 29, 39]               # 19.5 -> 20
    assert sample_indices(7, 1) == [0]
    assert sample_indices(3, 3) == [0, 1, 2]


def test_fps_selection_is_exact(videos):
    # 40 frames at 10 fps = 4 s; 2 fps -> 8 frames; 320x240: 22x17 = 374 patches <= 768, kept; padded to 336x252:
    # grid 18x24 = 432 patches = 108 tokens (docs/model.md §4)
    plan = plan_video(videos / "forty.mp4", MediaSettings(), GEO)
    assert plan.n_frames == 40 and plan.indices == (0, 6, 11, 17, 22, 28, 33, 39)
    assert plan.times == pytest.approx([0.0, 0.6, 1.1, 1.7, 2.2, 2.8, 3.3, 3.9])
    assert plan.size == (320, 240) and plan.tokens == 108
    msgs, st = expand_parts([{"role": "user", "content": [{"type": "video", "video": str(videos / "forty.mp4")},
                                                          {"type": "text", "text": "What happens?"}]}],
                            MediaSettings(), CFG)
    parts = msgs[0]["content"]
    assert [p["type"] for p in parts] == ["image"] * 8 + ["text"]
    assert [number(p["image"]) for p in parts[:8]] == [0, 6, 11, 17, 22, 28, 33, 39]
    assert all(p["image"].size == (320, 240) for p in parts[:8])
    assert st.frames == 8 and st.frame_tokens == [108] * 8 and st.decode_seconds > 0


def test_frame_count_and_max_frames(videos):
    src = videos / "forty.mp4"
    assert plan_video(src, MediaSettings(frames=4), GEO).indices == (0, 13, 26, 39)
    assert plan_video(src, MediaSettings(fps=100, max_frames=5), GEO).indices == (0, 10, 20, 29, 39)
    assert plan_video(src, MediaSettings(fps=0.1), GEO).indices == (0,)   # ceil(4 s x 0.1) = 1 frame
    with pytest.raises(UsageError, match="frames 20 exceeds max_frames 16"):
        MediaSettings(frames=20).validate()


def test_per_frame_patch_cap_resizes_like_the_processor(videos):
    # 640x360: 45x25 = 1125 patches > 768 -> s = sqrt(768/1125) = 0.82624 -> 528x297 (floors); the model's own
    # budget (4096) keeps it; padded 532x308: 22x38 = 836 patches = 209 tokens
    plan = plan_video(videos / "wide.mp4", MediaSettings(frames=3), GEO)
    assert plan.size == (528, 297) and plan.tokens == 209 and plan.indices == (0, 1, 2)
    msgs, st = expand_parts([{"role": "user", "content": [{"type": "video", "video": str(videos / "wide.mp4")}]}],
                            MediaSettings(frames=3), CFG)
    assert [p["image"].size for p in msgs[0]["content"]] == [(528, 297)] * 3
    assert [number(p["image"]) for p in msgs[0]["content"]] == [0, 1, 2]


def test_timestamps_are_off_by_default_and_precede_frames_when_on(videos):
    part = {"type": "video", "video": str(videos / "forty.mp4")}
    msgs, _ = expand_parts([{"role": "user", "content": [part]}], MediaSettings(frames=3, timestamps=True), CFG)
    parts = msgs[0]["content"]
    # 40 frames: indices 0, 20 (19.5 up), 39 at 10 fps
    assert [p.get("text") for p in parts[::2]] == ["[0.0s]", "[2.0s]", "[3.9s]"]
    assert [number(p["image"]) for p in parts[1::2]] == [0, 20, 39]


def test_bytes_data_uri_and_video_url_parts(videos):
    import base64

    data = (videos / "forty.mp4").read_bytes()
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    s = MediaSettings(frames=2)
    for part in ({"type": "video", "video": data}, {"type": "video_url", "video_url": {"url": uri}},
                 {"type": "video_url", "video_url": {"url": str(videos / "forty.mp4")}}):
        msgs, st = expand_parts([{"role": "user", "content": [part]}], s, CFG)
        assert [number(p["image"]) for p in msgs[0]["content"]] == [0, 39] and st.frames == 2


@pytest.mark.parametrize("suffix, codec", [("mkv", "mpeg4"), ("mov", "mjpeg"), ("webm", "libvpx")])
def test_other_containers(tmp_path, suffix, codec):
    if codec not in av.codecs_available:
        pytest.fail(f"PyAV's FFmpeg has no {codec} encoder to make the fixture")
    path = write_video(tmp_path / f"v.{suffix}", 20, fps=10, codec=codec)
    plan = plan_video(path, MediaSettings(frames=3), GEO)
    assert plan.n_frames == 20 and plan.indices == (0, 10, 19)   # 19 i / 2, halves up
    msgs, _ = expand_parts([{"role": "user", "content": [{"type": "video", "video": str(path)}]}],
                           MediaSettings(frames=3), CFG)
    assert [number(p["image"]) for p in msgs[0]["content"]] == [0, 10, 19]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_gif_and_webp(tmp_path, fmt):
    frames = [picture(i, (60, 40)) for i in range(12)]
    path = tmp_path / f"a.{fmt.lower()}"
    kw = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    # 12 frames x 100 ms = 1.2 s; 2 fps -> ceil(2.4) = 3 frames: 0, 5.5 -> 6, 11
    plan = plan_video(path, MediaSettings(), GEO)
    assert plan.n_frames == 12 and plan.indices == (0, 6, 11)
    # 60x40 -> padded 84x56: 4x6 patches = 6 tokens
    assert plan.size == (60, 40) and plan.tokens == 6
    msgs, _ = expand_parts([{"role": "user", "content": [{"type": "video", "video": path.read_bytes()}]}],
                           MediaSettings(), CFG)
    assert [number(p["image"]) for p in msgs[0]["content"]] == [0, 6, 11]


# ---------------------------------------------------------------------------------------------------------------
# Video: seeking, and the decode-everything fallback for a stream that cannot seek


class CountingContainer:
    """A PyAV input container that counts the frames it decodes; ``seekable=False`` makes every seek fail as PyAV
    fails on a stream without an index."""

    def __init__(self, container, counts: list[int], seekable: bool):
        self._c, self._counts, self._seekable = container, counts, seekable

    def seek(self, *args, **kwargs):
        if not self._seekable:
            raise ValueError("cannot seek this stream")
        return self._c.seek(*args, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self._c.decode(*args, **kwargs):
            self._counts[-1] += 1
            yield frame

    def __getattr__(self, name):
        return getattr(self._c, name)


def counting_decoder(monkeypatch, seekable: bool) -> list[int]:
    """Frames decoded per opened container, in order (the video is opened again after a failed seek)."""
    import kimivl_edge.media.video as video

    counts: list[int] = []
    real = video._open_av

    def opened(source):
        container, stream = real(source)
        counts.append(0)
        return CountingContainer(container, counts, seekable), stream

    monkeypatch.setattr(video, "_open_av", opened)
    return counts


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """400 frames (40 s at 10 fps), a keyframe every 10."""
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", 400, size=(192, 96), gop=10)


def test_seeking_decodes_only_from_the_keyframe_before_each_sampled_frame(long_video, monkeypatch):
    from kimivl_edge.media import decode_video

    plan = plan_video(long_video, MediaSettings(), GEO)
    # 40 s x 2 fps = 80 -> max_frames 16: 399 i / 15, halves up
    assert plan.indices == (0, 27, 53, 80, 106, 133, 160, 186, 213, 239, 266, 293, 319, 346, 372, 399)
    counts = counting_decoder(monkeypatch, seekable=True)
    frames = decode_video(plan)
    assert [number(f) for f in frames] == [i % 64 for i in plan.indices]
    # each seek lands on the keyframe at or before the frame (every 10th) and decodes forward to it: at most 10
    # frames per sampled frame, against the 400 of the whole video
    assert len(counts) == 1 and counts[0] <= 16 * 10


def test_a_stream_that_cannot_seek_is_decoded_once_from_the_start(long_video, monkeypatch):
    from kimivl_edge.media import decode_video

    plan = plan_video(long_video, MediaSettings(), GEO)
    counts = counting_decoder(monkeypatch, seekable=False)
    frames = decode_video(plan)
    assert [number(f) for f in frames] == [i % 64 for i in plan.indices]
    # the failed seek decoded nothing; the second opening decoded every frame up to the last sampled one, 399
    assert counts == [0, 400]


# ---------------------------------------------------------------------------------------------------------------
# Video: budgets and broken files


def test_video_budget_error_names_the_numbers_and_the_setting(videos):
    with pytest.raises(MediaError) as e:
        plan_video(videos / "forty.mp4", MediaSettings(video_tokens=500), GEO)
    msg = str(e.value)
    assert "8 frames x 108 tokens = 864 image tokens" in msg and "500" in msg and "--max-frames" in msg


def test_context_overflow_is_refused_before_decoding(videos):
    with pytest.raises(MediaError, match=r"need 864 tokens but the context holds 512: raise n_ctx \(--ctx\)"):
        expand_parts([{"role": "user", "content": [{"type": "video", "video": str(videos / "forty.mp4")}]}],
                     MediaSettings(), CFG, context_tokens=512)


def test_corrupt_truncated_empty_and_missing_videos(videos, tmp_path):
    s = MediaSettings()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(MediaError, match="garbage.mp4: not a readable video"):
        plan_video(garbage, s, GEO)
    with pytest.raises(MediaError, match="not found"):
        plan_video(tmp_path / "nope.mp4", s, GEO)
    with pytest.raises(MediaError, match="empty video"):
        plan_video(b"", s, GEO)
    for suffix, codec, msg in (("mp4", "mpeg4", "no video frames"), ("mkv", "mpeg4", "not a readable video")):
        zero = tmp_path / f"zero.{suffix}"      # a header, no frame
        with av.open(str(zero), "w") as out:
            st = out.add_stream(codec, rate=10)
            st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
            out.start_encoding()
        with pytest.raises(MediaError, match=f"zero.{suffix}: {msg}"):
            expand_parts([{"role": "user", "content": [{"type": "video", "video": str(zero)}]}], s, CFG)


def test_truncated_video_is_a_clear_error(videos, tmp_path):
    data = (videos / "forty.mp4").read_bytes()
    for keep in (0.5, 0.9):
        cut = tmp_path / f"cut{keep}.mp4"
        cut.write_bytes(data[:int(len(data) * keep)])
        with pytest.raises(MediaError, match=f"cut{keep}.mp4: "):
            expand_parts([{"role": "user", "content": [{"type": "video", "video": str(cut)}]}], MediaSettings(),
                         CFG)


def test_huge_resolution_is_refused_before_decoding(tmp_path):
    """A 256x256 FFV1 .mkv whose header claims 16000x16000 (2.56e8 px > 2^27; FFV1 takes its size from the
    container), and a GIF whose screen descriptor does: both refused from the header, nothing decoded."""
    path = write_video(tmp_path / "small.mkv", 2, size=(256, 256), codec="ffv1")
    data = path.read_bytes()
    w16 = (16000).to_bytes(2, "big")
    # Matroska PixelWidth (0xB0) and PixelHeight (0xBA), two-byte values 256
    patched = data.replace(b"\xb0\x82\x01\x00", b"\xb0\x82" + w16).replace(b"\xba\x82\x01\x00", b"\xba\x82" + w16)
    assert patched != data
    (tmp_path / "huge.mkv").write_bytes(patched)
    with pytest.raises(MediaError, match="huge.mkv: 16000x16000 frames exceed the limit"):
        plan_video(tmp_path / "huge.mkv", MediaSettings(), GEO)
    gif = io.BytesIO()
    picture(1, (8, 8)).save(gif, "GIF", save_all=True, append_images=[picture(2, (8, 8))])
    big = bytearray(gif.getvalue())
    big[6:10] = (16000).to_bytes(2, "little") * 2       # logical screen width, height
    with pytest.raises(MediaError, match="video bytes: the frames exceed the limit of 134217728 pixels"):
        plan_video(bytes(big), MediaSettings(), GEO)


def test_without_mmproj_media_are_refused():
    with pytest.raises(UsageError, match="without an mmproj"):
        expand_parts([{"role": "user", "content": [{"type": "video", "video": b"x"}]}])


def test_messages_without_media_pass_through_untouched():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]
    out, st = expand_parts(msgs)
    assert out == msgs and st.frames == 0 and st.pages == 0


# ---------------------------------------------------------------------------------------------------------------
# PDF


def write_pdf(path: Path, n: int, size=(306, 396)) -> Path:
    """n pages of size points (Pillow at 72 dpi: one pixel per point), page k showing the number k."""
    pages = [picture(k, size) for k in range(1, n + 1)]
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return path


def test_parse_pages():
    assert parse_pages(None, 5) == [1, 2, 3, 4, 5]
    assert parse_pages("2-4,1, 9-", 10) == [2, 3, 4, 1, 9, 10]
    assert parse_pages("-2", 10) == [1, 2]
    assert parse_pages("3-40", 5) == [3, 4, 5]          # clipped to the document
    for bad, msg in (("0", "not a valid range"), ("4-2", "not a valid range"), ("a", "not a page"),
                     ("12", "page 12 does not exist"), ("1,,2", "not a page")):
        with pytest.raises(UsageError, match=msg):
            parse_pages(bad, 10)


def test_page_dpi_fills_the_page_budget_exactly(tmp_path):
    # US Letter 612x792 pt, page_patches 1024: scale = sqrt(1024 x 196 / (612 x 792)) = 0.64349 px/pt (46.3 dpi)
    # -> ceil(393.8) x ceil(509.6) = 394x510 px (pypdfium2 rounds up): 28 x 36 = 1008 patches <= 1024, kept;
    # padded 420x532: 30x38 = 1140 patches = 285 tokens
    path = write_pdf(tmp_path / "letter.pdf", 2, size=(612, 792))
    plan = plan_document(path, MediaSettings(page_patches=1024), GEO)
    assert plan.pages == (1, 2) and plan.sizes == ((394, 510), (394, 510)) and plan.tokens == (285, 285)
    assert plan.scales[0] == pytest.approx(0.64349, abs=1e-5) and plan.note == ""
    msgs, st = expand_parts([{"role": "user", "content": [{"type": "document", "document": str(path)}]}],
                            MediaSettings(page_patches=1024), CFG)
    imgs = [p["image"] for p in msgs[0]["content"]]
    assert [im.size for im in imgs] == [(394, 510)] * 2       # rendered at that size, not resized afterwards
    assert [number(im) for im in imgs] == [1, 2] and st.pages == 2 and st.page_tokens == [285, 285]


def test_pages_of_mixed_sizes_each_get_the_dpi_of_their_own_budget(tmp_path):
    # page_patches 1024 (14x14 px each), sizes in points; scale = sqrt(1024 x 196 / (w x h)) px/pt, pypdfium2's
    # bitmap ceil(side x scale), all under 1024 patches (kept), then padded to multiples of 28:
    # Letter 612x792: 0.64349 -> 394x510 (28x36 = 1008 patches), padded 420x532: 30x38 / 4 = 285 tokens
    # 200x100:        3.16784 -> 634x317 (45x22 = 990),            padded 644x336: 46x24 / 4 = 276 tokens
    # 300x200:        1.82895 -> 549x366 (39x26 = 1014),           padded 560x392: 40x28 / 4 = 280 tokens
    path = tmp_path / "mixed.pdf"
    pages = [picture(1, (612, 792)), picture(2, (200, 100)), picture(3, (300, 200))]
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    s = MediaSettings(page_patches=1024)
    plan = plan_document(path, s, GEO)
    assert plan.scales == pytest.approx([0.64349, 3.16784, 1.82895], abs=1e-5)
    assert plan.sizes == ((394, 510), (634, 317), (549, 366)) and plan.tokens == (285, 276, 280)
    msgs, st = expand_parts([{"role": "user", "content": [{"type": "document", "document": str(path)}]}], s, CFG)
    imgs = [p["image"] for p in msgs[0]["content"]]
    assert [im.size for im in imgs] == [(394, 510), (634, 317), (549, 366)]
    assert [number(im) for im in imgs] == [1, 2, 3] and st.page_tokens == [285, 276, 280]


def test_page_ranges_cap_and_budget_drop_pages_and_say_so(tmp_path):
    # 306x396 pt at page_patches 4096: scale = sqrt(4096 x 196 / (306 x 396)) = 2.57394 -> 788x1020 px (pypdfium2
    # rounds up): 56 x 72 = 4032 patches <= 4096, kept; padded 812x1036: 58x74 = 4292 patches = 1073 tokens per page
    path = write_pdf(tmp_path / "twenty.pdf", 20)
    plan = plan_document(path, MediaSettings(max_pages=5), GEO, pages="3-")
    assert plan.pages == (3, 4, 5, 6, 7)
    assert plan.note == f"{path}: pages 8-20 dropped (max_pages 5, --max-pages)"
    per_page = plan.tokens[0]
    assert plan.tokens == (1073,) * 5 and plan.sizes == ((788, 1020),) * 5
    plan = plan_document(path, MediaSettings(document_tokens=3 * per_page + 1), GEO, pages="1-2,10-12")
    assert plan.pages == (1, 2, 10)
    assert plan.note == f"{path}: pages 11-12 dropped (document_tokens {3 * per_page + 1}, --doc-tokens)"
    msgs, st = expand_parts([{"role": "user", "content": [
        {"type": "text", "text": "Question first, as MMLongBench-Doc sends it."},
        {"type": "document", "document": str(path), "pages": "1-2,10-12"}]}],
        MediaSettings(document_tokens=3 * per_page + 1), CFG)
    parts = msgs[0]["content"]
    assert parts[0]["type"] == "text" and [number(p["image"]) for p in parts[1:]] == [1, 2, 10]
    assert st.notes == [plan.note]
    with pytest.raises(MediaError, match=f"page 1 alone needs {per_page} image tokens, over the document budget"):
        plan_document(path, MediaSettings(document_tokens=per_page - 1), GEO)


def test_openai_file_part_with_a_data_uri(tmp_path):
    import base64

    data = write_pdf(tmp_path / "d.pdf", 3).read_bytes()
    part = {"type": "file", "file": {"file_data": "data:application/pdf;base64," + base64.b64encode(data).decode(),
                                     "filename": "report.pdf"}}
    msgs, st = expand_parts([{"role": "user", "content": [part]}], MediaSettings(max_pages=2), CFG)
    assert [number(p["image"]) for p in msgs[0]["content"]] == [1, 2]
    assert st.notes == ["report.pdf: pages 3 dropped (max_pages 2, --max-pages)"]
    with pytest.raises(UsageError, match="file_data"):
        expand_parts([{"role": "user", "content": [{"type": "file", "file": {"file_id": "f-1"}}]}], None, CFG)


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for b in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(b ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: bytes) -> bytes:
    """A one-page PDF under the standard security handler, revision 2 (40-bit RC4; PDF 1.7 §7.6.3, algorithms
    2-4), opened only with ``user_password``. The page has no strings or streams, so nothing else is encrypted."""
    pad = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
    file_id = hashlib.md5(b"kimivl-edge test").digest()
    owner_key = hashlib.md5((b"owner" + pad)[:32]).digest()[:5]
    o = _rc4(owner_key, (user_password + pad)[:32])
    p = -4
    key = hashlib.md5((user_password + pad)[:32] + o + p.to_bytes(4, "little", signed=True) + file_id).digest()[:5]
    u = _rc4(key, pad)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
            b"<< /Filter /Standard /V 1 /R 2 /O <" + o.hex().encode() + b"> /U <" + u.hex().encode()
            + b"> /P -4 >>"]
    hid = file_id.hex().encode()
    return pdf_bytes(objs, b"/Encrypt 4 0 R /ID [<" + hid + b"><" + hid + b">]")


def pdf_bytes(objs: list[bytes], trailer: bytes = b"") -> bytes:
    """A PDF of the given objects (1 = the catalog) with a correct cross-reference table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for k, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % k + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R " % (len(objs) + 1) + trailer
              + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)
    return out.getvalue()


def test_encrypted_broken_and_empty_pdfs(tmp_path):
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(encrypted_pdf(b"secret"))
    assert len(pdfium.PdfDocument(str(locked), password="secret")) == 1   # really encrypted, and well formed
    with pytest.raises(MediaError, match="locked.pdf: the PDF is password-protected"):
        plan_document(locked, MediaSettings(), GEO)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not a PDF body\n")
    with pytest.raises(MediaError, match="broken.pdf: not a readable PDF.*Data format error"):
        plan_document(broken, MediaSettings(), GEO)
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(pdf_bytes([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]))
    with pytest.raises(MediaError, match="empty.pdf: not a readable PDF, or one without pages"):
        plan_document(empty, MediaSettings(), GEO)


# ---------------------------------------------------------------------------------------------------------------
# Through the model: the rendered prompt's images, stats, and the CLI


@pytest.fixture(scope="module")
def model_pair(converted, tiny_checkpoint):
    # media plumbing, not answers: a tiny checkpoint with the real models' 4096-patch budget (the trained assets
    # have 196, which would cap every frame and page)
    return converted(tiny_checkpoint(), "f32", "f32")


@pytest.fixture(scope="module")
def model(model_pair):
    from kimivl_edge import KimiVL

    m = KimiVL.load(*model_pair, n_ctx=8192, n_threads=1, kv_type="f32")
    yield m
    m.close()


RECORDER = """
import pickle, sys
from kimivl_edge import KimiVL, cli

real = KimiVL.render_prompt

def recording(self, messages, *args, **kwargs):
    prompt = real(self, messages, *args, **kwargs)
    with open(sys.argv[1], "ab") as f:
        pickle.dump((self.detokenize(prompt.ids), prompt), f)
    return prompt

KimiVL.render_prompt = recording
sys.exit(cli.main(sys.argv[2:]))
"""


def run_recording(log: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, list]]]:
    """``kimivl-edge ARGS`` in a child that also records every prompt the model renders: its text (detokenized, one
    <|media_pad|> per image) and the ``RenderedPrompt`` (its images as preprocessed)."""
    r = subprocess.run([sys.executable, "-c", RECORDER, str(log), *args], capture_output=True, text=True,
                       timeout=300)
    prompts = []
    with open(log, "rb") as f:
        while True:
            try:
                prompts.append(pickle.load(f))
            except EOFError:
                return r, prompts


def _prompt_numbers(prompt) -> list[int]:
    """Each prompt image's number, read back from the patches the model receives (unpadded content only)."""
    out = []
    for im in prompt.images:
        gh, gw = im.grid
        view = im.patches.reshape(gh, gw, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(gh * 14, gw * 14, 3)
        out.append(read_bands((view[:im.size[1], :im.size[0]] * 0.5 + 0.5) * 255))
    return out


def test_images_reach_the_model_in_order(model, videos, tmp_path):
    pdf = write_pdf(tmp_path / "doc.pdf", 4)
    img = tmp_path / "still.png"
    picture(30, (56, 56)).save(img)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(img)},
                                         {"type": "video", "video": str(videos / "forty.mp4")},
                                         {"type": "text", "text": "and"},
                                         {"type": "document", "document": str(pdf), "pages": "4,2"},
                                         {"type": "text", "text": "Describe."}]}]
    model.media_settings = MediaSettings(frames=3)
    prompt = model.render_prompt(msgs)
    assert _prompt_numbers(prompt) == [30, 0, 20, 39, 4, 2]
    assert prompt.media.frames == 3 and prompt.media.frame_tokens == [108] * 3 and prompt.media.pages == 2
    assert [im.size for im in prompt.images[:4]] == [(56, 56)] + [(320, 240)] * 3


def test_generate_reports_media_stats_and_image_sizes(model, videos):
    model.media_settings = MediaSettings(frames=2)
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(videos / "wide.mp4")},
                                         {"type": "text", "text": "What colour?"}]}]
    stream = model.stream_tokens(msgs, max_tokens=2, temperature=0)
    list(stream)
    assert stream.stats.media.frames == 2 and stream.stats.media.frame_tokens == [209, 209]
    # the frames are handed over at 528x297; their original size is the video's
    assert stream.stats.image_tokens == 418 and stream.image_sizes == [(640, 360)] * 2
    out = model.generate(msgs, max_tokens=2, temperature=0)
    assert out.stats.media.frames == 2 and isinstance(out.grounding, list)


def test_grounding_on_a_video_frame_is_in_pixels_of_the_video(model, videos):
    """A frame is handed to the model at its sampled size (640x360 -> 528x297 under the 768-patch frame cap), but
    the points are mapped to the video's own pixels, the frame the user gave."""
    model.media_settings = MediaSettings(frames=2)
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(videos / "wide.mp4")},
                                         {"type": "text", "text": "Where is the white band?"}]}]
    click = "pyautogui.click(x=0.250, y=0.500)"
    out = model.generate(msgs, temperature=0, max_tokens=40, grammar=f'root ::= "{click}"')
    assert out.answer.startswith(click)  # random weights: past the grammar's end a non-stop special may follow
    (action,) = out.grounding
    # the last frame (image 1 of 0-1) of the 640x360 video: 0.25 x 640 = 160, 0.5 x 360 = 180
    assert action.image_index == 1 and action.points == ((160.0, 180.0),) and action.normalized == (0.25, 0.5)


def test_cli_run_video_and_pdf(model_pair, videos, tmp_path):
    text, mm = model_pair
    pdf = write_pdf(tmp_path / "doc.pdf", 3)
    r = run_cli("run", "-m", str(text), "--mmproj", str(mm), "--video", str(videos / "forty.mp4"), "--pdf", str(pdf),
                "--pages", "1-3", "--max-pages", "2", "-p", "Describe.", "--temp", "0", "--max-tokens", "2",
                "--frames", "3", "--ctx", "8192", "--threads", "1", "--stats")
    assert r.returncode == 0, r.stderr
    assert f"note: {pdf}: pages 3 dropped (max_pages 2, --max-pages)" in r.stderr
    assert "video frames 3 (108 tokens each), PDF pages 2" in r.stderr


def test_cli_two_videos_with_timestamps_reach_the_model_in_order(model_pair, videos, tmp_path):
    import re

    text, mm = model_pair
    r, prompts = run_recording(tmp_path / "prompts.pkl", "run", "-m", str(text), "--mmproj", str(mm), "--video",
                               str(videos / "forty.mp4"), "--video", str(videos / "wide.mp4"), "--frames", "2",
                               "--timestamps", "-p", "Compare.", "--temp", "0", "--max-tokens", "2", "--ctx", "8192",
                               "--threads", "1", "--stats")
    assert r.returncode == 0, r.stderr
    ((rendered, prompt),) = prompts
    # forty.mp4: frames 0 and 39 at 10 fps; wide.mp4 (3 frames): 0 and 2
    assert _prompt_numbers(prompt) == [0, 39, 0, 2]
    # original sizes (wide.mp4 is 640x360); handed over at 528x297 under the 768-patch frame cap: a 22x38 patch grid
    assert [im.size for im in prompt.images] == [(320, 240)] * 2 + [(640, 360)] * 2
    assert [im.grid for im in prompt.images][2:] == [(22, 38)] * 2
    assert re.findall(r"\[(\d+\.\d)s\]<\|media_start\|>", rendered) == ["0.0", "3.9", "0.0", "0.2"]
    assert rendered.index("<|media_end|>Compare.<|im_end|>") > rendered.rindex("[0.2s]")
    # 2 x 108 + 2 x 209 tokens
    assert "video frames 4 (634 tokens: 108 to 209 per frame), PDF pages 0" in r.stderr


def test_cli_ground_sends_the_model_cards_prompt(model_pair, tmp_path):
    text, mm = model_pair
    shot = tmp_path / "shot.png"
    picture(5, (300, 200)).save(shot)
    r, prompts = run_recording(tmp_path / "prompts.pkl", "run", "-m", str(text), "--mmproj", str(mm), "--image",
                               str(shot), "--ground", " the OK button ", "--temp", "0", "--max-tokens", "1",
                               "--threads", "1")
    assert r.returncode == 0, r.stderr
    ((rendered, prompt),) = prompts
    assert _prompt_numbers(prompt) == [5]
    # the model card's words, typed out here rather than taken from grounding.GROUND_PROMPT
    card = "请观察屏幕截图，请通过操作和坐标点定位以下元素。<指令> "
    assert rendered.endswith("<|media_end|>" + card + "the OK button<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_cli_run_on_a_terminal_shows_the_encoding_progress(model_pair, videos, tiny_checkpoint):
    """stderr on a pseudo-terminal (stdout a pipe, as `run ... > answer.txt` in a terminal): one self-overwriting
    line per vision layer, erased at the end."""
    import json
    import os
    import pty

    text, mm = model_pair
    layers = json.loads((tiny_checkpoint() / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "kimivl_edge", "run", "-m", str(text), "--mmproj", str(mm),
                             "--video", str(videos / "forty.mp4"), "--frames", "2", "-p", "What is it?", "--temp",
                             "0", "--max-tokens", "2", "--threads", "1", "--no-cache"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:   # EIO: the child has gone, the terminal is closed
            break
        if not data:
            break
        shown += data
    os.close(master)
    assert proc.wait() == 0 and proc.stdout is not None and proc.stdout.read()
    steps = [f"\rencoding images: layer {i}/{layers}".encode() for i in range(1, layers + 1)]
    at = [shown.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), bytes(shown)
    assert shown[at[-1] + len(steps[-1]):].startswith(b"\r\x1b[K")   # the finished line is erased


def test_cli_errors_are_one_line(model_pair, tmp_path):
    text, mm = model_pair
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    r = run_cli("run", "-m", str(text), "--mmproj", str(mm), "--video", str(bad), "-p", "x", "--threads", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.mp4: not a readable video" in r.stderr
    r = run_cli("run", "-m", str(text), "--pdf", str(bad), "-p", "x")
    assert r.returncode == 2 and "need --mmproj" in r.stderr
    r = run_cli("run", "-m", str(text), "--mmproj", str(mm), "--video", str(bad), "-p", "x", "--frames", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "frames must be a positive integer" in r.stderr


def test_chat_video_and_pdf_commands(model_pair, videos, tmp_path):
    text, mm = model_pair
    pdf = write_pdf(tmp_path / "doc.pdf", 3)
    script = (f"/video {videos / 'forty.mp4'}\n/pdf {pdf} 2-3\nWhat is it?\n/pdf {tmp_path / 'missing.pdf'}\n"
              "/quit\n")
    r = run_cli("chat", "-m", str(text), "--mmproj", str(mm), "--temp", "0", "--max-tokens", "2", "--frames", "2",
                "--ctx", "8192", "--threads", "1", stdin=script)
    assert r.returncode == 0, r.stderr
    assert f"(video {videos / 'forty.mp4'} attached to the next message)" in r.stderr
    assert f"(pdf {pdf} 2-3 attached to the next message)" in r.stderr
    assert "missing.pdf: document file not found" in r.stderr


def test_user_message_has_one_home_and_puts_the_media_before_the_text():
    import kimivl_edge.media as media
    from kimivl_edge.prompt import user_message

    assert user_message("Q?", ["a.png"], ["v.mp4", "w.gif"], ["d.pdf"], "1-2") == {"role": "user", "content": [
        {"type": "image", "image": "a.png"}, {"type": "video", "video": "v.mp4"}, {"type": "video", "video": "w.gif"},
        {"type": "document", "document": "d.pdf", "pages": "1-2"}, {"type": "text", "text": "Q?"}]}
    assert user_message("Q?", documents=[b"%PDF"]) == {"role": "user", "content": [
        {"type": "document", "document": b"%PDF"}, {"type": "text", "text": "Q?"}]}
    assert user_message("Hi") == {"role": "user", "content": "Hi"}
    assert not hasattr(media, "user_message")


def test_media_errors_are_kimivl_errors():
    assert issubclass(MediaError, KimiVLError)


# ---------------------------------------------------------------------------------------------------------------
# Decoded frames and pages are cached by file identity (a chat resends its history every turn)


def test_history_media_are_decoded_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    import kimivl_edge.media.expand as expand

    calls: list[str] = []
    for name in ("decode_video", "render_document"):
        real = getattr(expand, name)
        monkeypatch.setattr(expand, name, lambda plan, real=real, name=name: calls.append(name) or real(plan))
    monkeypatch.setattr(expand, "DECODED", expand.DecodedCache(size=2))
    video, pdf = write_video(tmp_path / "v.mp4", 5), write_pdf(tmp_path / "d.pdf", 2)
    msgs = [{"role": "user", "content": [{"type": "video", "video": str(video)},
                                         {"type": "document", "document": str(pdf)}]}]
    s = MediaSettings(frames=2)

    def numbers() -> list[int]:
        out, _ = expand_parts(msgs, s, CFG)
        return [number(p["image"]) for p in out[0]["content"]]

    assert numbers() == [0, 4, 1, 2] and numbers() == [0, 4, 1, 2]
    assert calls == ["decode_video", "render_document"]          # the second turn decoded nothing
    write_video(video, 9)                                         # the same path, new content: decoded again
    assert numbers() == [0, 8, 1, 2] and calls[2:] == ["decode_video"]
    data = video.read_bytes()
    for _ in range(2):                                            # bytes are keyed by their hash
        out, _ = expand_parts([{"role": "user", "content": [{"type": "video", "video": data}]}], s, CFG)
    assert calls[3:] == ["decode_video"]
    numbers()      # two entries at most: the bytes' frames evicted the file's, whose new entry then evicted the pages
    assert calls[4:] == ["decode_video", "render_document"]
