"""Accuracy of every quantization of the trained tiny model, against the fp32 reference (issue 5's table).

    .venv/bin/python -m training.quant_table [--ckpt kimivl_edge/assets/kimi-vl-tiny] [--n 600] [--out docs]

For each text type (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0) x mmproj type (F16, Q8_0, Q4_0), converted by our CLI
code and run through our runtime (numpy vision, llama.cpp decoder, F32 KV cache so only the weights differ), on the
held-out questions (training.evaluate's seed):
  - file sizes; task accuracy (greedy answers, training.tasks.is_correct);
  - mean KL divergence KL(reference || quantized) and top-1 agreement of the next-token distributions, teacher-forced
    over the reference answer tokens and the end-of-turn token;
  - vision per-token cosine of the projected image embeddings vs the reference.
One more row runs llama.cpp's own vision path (ggml backend) on the Q8_0 text + F16 mmproj.
Writes OUT/quant-accuracy.md, .json and .png (accuracy and KLD against total size).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from kimivl_edge.quant.metrics import cosine_rows, kl_divergence

TEXT_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
MMPROJ_TYPES = ("f16", "q8_0", "q4_0")
DEFAULT_CKPT = Path(__file__).resolve().parent.parent / "kimivl_edge" / "assets" / "kimi-vl-tiny"


class ReferenceData:
    """What the fp32 reference says about each question: its answer, teacher-forced logits, image embeddings."""

    def __init__(self, ckpt: Path, questions):
        import torch

        from kimivl_edge.reference.model import ReferenceModel

        from .evaluate import MAX_NEW_TOKENS

        torch.set_num_threads(1)  # tiny matrices: more threads only oversubscribe the cores
        self.model = ref = ReferenceModel(ckpt)
        self.answer_ids, self.logits, self.embeds = [], [], []
        for q in questions:
            msgs = q.messages()
            p = ref.prepare(msgs)
            ids = [t for t in ref.generate_ids(p, MAX_NEW_TOKENS) if t not in ref.tokenizer.stop_ids]
            forced = ids + [ref.tokenizer.im_end_id]
            p.input_ids = p.input_ids + forced
            full = ref.logits(p).double().numpy()
            self.answer_ids.append(forced)
            self.logits.append(full[-len(forced) - 1: -1])  # the positions that predict each forced token
            self.embeds.append(ref.image_embeds(p.pixel_values, p.grid_hws).numpy())


def run_config(text: Path, mmproj: Path, questions, ref: ReferenceData, backend: str = "numpy") -> dict:
    from kimivl_edge.model import KimiVL

    from .tasks import is_correct

    from .evaluate import MAX_NEW_TOKENS

    kls, top1, cos, right = [], [], [], []

    with KimiVL.load(text, mmproj, kv_type="f32", n_ctx=1024, vision_backend=backend, n_threads=1) as m:
        for q, forced, rlog, remb in zip(questions, ref.answer_ids, ref.logits, ref.embeds):
            msgs = q.messages()
            out = m.generate(msgs, temperature=0, max_tokens=MAX_NEW_TOKENS)
            right.append(is_correct(q, out.text))
            got = m.logits(msgs, forced)[:-1]  # the positions that predict each forced token
            kls.append(kl_divergence(got, rlog))
            top1.append(rlog.argmax(-1) == got.argmax(-1))
            emb = np.concatenate(m.encode_images([s.render(False) for s in q.scenes]))
            cos.append(cosine_rows(emb, remb))
    kls, top1, cos = np.concatenate(kls), np.concatenate(top1), np.concatenate(cos)
    return {"accuracy": float(np.mean(right)), "kld": float(kls.mean()), "top1": float(top1.mean()),
            "vision_cos_mean": float(cos.mean()), "vision_cos_min": float(cos.min())}


def build_table(ckpt: Path, n: int, workdir: Path, text_types=TEXT_TYPES, mmproj_types=MMPROJ_TYPES,
                ggml_row: bool = True, seed: int | None = None) -> dict:
    from kimivl_edge.convert import convert_checkpoint

    from .evaluate import EVAL_SEED
    from .tasks import is_correct, question_set

    qs = question_set(EVAL_SEED if seed is None else seed, n)
    ref = ReferenceData(ckpt, qs)
    tok = ref.model.tokenizer
    ref_acc = float(np.mean([is_correct(q, tok.decode(a[:-1])) for q, a in zip(qs, ref.answer_ids)]))
    rows = []
    for t in text_types:
        for mt in mmproj_types:
            text, mm = convert_checkpoint(ckpt, t, mt, workdir / f"{t}-{mt}", variant="instruct")
            r = run_config(text, mm, qs, ref)
            r.update(text_type=t.upper(), mmproj_type=mt.upper(), backend="numpy",
                     text_mb=text.stat().st_size / 1e6, mmproj_mb=mm.stat().st_size / 1e6)
            rows.append(r)
            print(f"{t:7s} {mt:5s} acc {100 * r['accuracy']:5.1f}%  kld {r['kld']:.5f}  top1 {100 * r['top1']:5.1f}%  "
                  f"cos {r['vision_cos_mean']:.5f}", file=sys.stderr)
    if ggml_row:
        text, mm = convert_checkpoint(ckpt, "q8_0", "f16", workdir / "ggml", variant="instruct")
        r = run_config(text, mm, qs, ref, backend="ggml")
        r.update(text_type="Q8_0", mmproj_type="F16", backend="ggml (llama.cpp clip)",
                 text_mb=text.stat().st_size / 1e6, mmproj_mb=mm.stat().st_size / 1e6)
        rows.append(r)
    return {"n": n, "checkpoint": str(ckpt), "reference_accuracy": ref_acc, "rows": rows}


def markdown(table: dict) -> str:
    lines = [
        "# Accuracy of every quantization (trained tiny Kimi-VL)",
        "",
        f"Regenerate: `.venv/bin/python -m training.quant_table --n {table['n']}`. Held-out questions: {table['n']}; "
        f"fp32 reference accuracy {100 * table['reference_accuracy']:.1f} %. KL divergence and top-1 agreement are "
        "teacher-forced over the reference answer tokens and the end-of-turn token; F32 KV cache.",
        "",
        "| text | mmproj | vision backend | text MB | mmproj MB | accuracy | mean KLD | top-1 "
        "| vision cos (mean / min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        lines.append(f"| {r['text_type']} | {r['mmproj_type']} | {r['backend']} | {r['text_mb']:.2f} | "
                     f"{r['mmproj_mb']:.2f} | {100 * r['accuracy']:.1f} % | {r['kld']:.5f} | {100 * r['top1']:.1f} % | "
                     f"{r['vision_cos_mean']:.5f} / {r['vision_cos_min']:.4f} |")
    lines += ["", "![accuracy and KL divergence against total size](quant-accuracy.png)", ""]
    return "\n".join(lines)


def chart(table: dict, path: Path) -> None:
    """Two panels (accuracy, mean KLD) against total size, drawn with Pillow."""
    from PIL import Image, ImageDraw

    rows = [r for r in table["rows"] if r["backend"] == "numpy"]
    W, H, pad = 900, 380, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    sizes = [r["text_mb"] + r["mmproj_mb"] for r in rows]
    xmin, xmax = min(sizes) * 0.95, max(sizes) * 1.05
    panels = [("task accuracy (%)", [100 * r["accuracy"] for r in rows]),
              ("mean KL divergence", [r["kld"] for r in rows])]
    colours = {"F16": (30, 90, 200), "Q8_0": (20, 150, 60), "Q4_0": (200, 60, 30)}
    pw = (W - 3 * pad) // 2
    for k, (title, ys) in enumerate(panels):
        x0 = pad + k * (pw + pad)
        ylo, yhi = min(ys), max(ys)
        if yhi - ylo < 1e-9:
            yhi = ylo + 1
        d.rectangle((x0, pad, x0 + pw, H - pad), outline="black")
        d.text((x0, pad - 20), title, fill="black")
        d.text((x0, H - pad + 8), f"total size {xmin:.1f} .. {xmax:.1f} MB", fill="black")
        d.text((x0 - 55, pad), f"{yhi:.3g}", fill="black")
        d.text((x0 - 55, H - pad - 10), f"{ylo:.3g}", fill="black")
        for r, x, y in zip(rows, sizes, ys):
            px = x0 + (x - xmin) / (xmax - xmin) * pw
            py = H - pad - (y - ylo) / (yhi - ylo) * (H - 2 * pad)
            c = colours.get(r["mmproj_type"], (0, 0, 0))
            d.ellipse((px - 4, py - 4, px + 4, py + 4), fill=c)
            d.text((px + 5, py - 6), r["text_type"], fill=c)
    d.text((pad, H - 22), "colour = mmproj type: blue F16, green Q8_0, red Q4_0", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.quant_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        table = build_table(args.ckpt, args.n, Path(tmp))
    (args.out / "quant-accuracy.json").write_text(json.dumps(table, indent=2) + "\n")
    (args.out / "quant-accuracy.md").write_text(markdown(table))
    chart(table, args.out / "quant-accuracy.png")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
