"""First and second question about the same 10-page PDF and 16-frame video (issue 17), on a converted pair.

    python -m kimivl_edge.bench.media_followup [--model TEXT.gguf --mmproj MMPROJ.gguf] [--threads 1] [--out DIR]

Without --model the bundled tiny checkpoint is converted to F32 under --out. The PDF (10 US Letter pages) and the
video (16 s of 640x360 at 10 fps) are generated; the defaults of ``MediaSettings`` apply. Each turn prints its time
to first token split into media decode/render, vision encode and prefill, and how many positions were evaluated:
the second turn re-renders the media but hits the embedding cache and the KV prefix. Not yet a `bench` section.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_inputs(root: Path) -> tuple[Path, Path]:
    import av

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimivl_edge.bench.media_followup")
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="build/media-followup")
    args = ap.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.model:
        text, mm = args.model, args.mmproj
    else:
        from ..convert import convert_checkpoint

        text, mm = convert_checkpoint(Path(__file__).parents[1] / "assets" / "kimi-vl-tiny", "f32", "f32",
                                      root / "pair")
    pdf, video = make_inputs(root)
    from ..model import KimiVL

    with KimiVL.load(text, mm, n_ctx=16384, n_threads=args.threads, kv_type="f32") as model:
        for name, part in (("10-page PDF", {"type": "document", "document": str(pdf)}),
                           ("16-frame video", {"type": "video", "video": str(video)})):
            history = [{"role": "user", "content": [part, {"type": "text", "text": "What is shown?"}]}]
            for turn in (1, 2):
                t0 = time.perf_counter()
                stream = model.stream_tokens(history, max_tokens=1, temperature=0)
                ids = list(stream)
                st = stream.stats
                print(f"{name} turn {turn}: TTFT {time.perf_counter() - t0:.2f} s = media "
                      f"{st.media.decode_seconds:.2f} + encode {st.encode_seconds:.2f} + prefill "
                      f"{st.prefill_seconds:.2f} s; image tokens {st.image_tokens}, evaluated "
                      f"{st.evaluated_tokens} of {st.prompt_tokens}")
                history += [{"role": "assistant", "content": model.detokenize(ids)},
                            {"role": "user", "content": "And a second question?"}]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
