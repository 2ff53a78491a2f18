"""Does an importance matrix help on the trained tiny model? KLD against the fp32 reference, with and without one.

    .venv/bin/python -m training.imatrix_kld [--n 200] [--seed 4245] [--calib-seed 77] [--types q4_k_m,iq4_xs]

Two importance matrices are collected by ``kimivl_edge.imatrix.collect`` on an F32 conversion of the model:
"default" from the built-in calibration set (``kimivl_edge.calibration``: multilingual prompts and generated
pictures, none of it like the tiny model's training data) and "tasks" from 100 questions of the training task
mix, with their answers, drawn with ``--calib-seed`` (never the held-out ``--seed``). Each text type is converted
without and with each, and measured as training.quant_table measures (F32 KV cache; KL(reference || quantized)
teacher-forced over the reference answers of the held-out questions, top-1 agreement, task accuracy); the mmproj
is Q8_0 throughout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .quant_table import DEFAULT_CKPT, ReferenceData, run_config


def _task_calibration(seed: int, n: int, d: Path) -> Path:
    """A calibration JSONL of ``n`` training-mix questions (their pictures saved as PNG) drawn with ``seed``."""
    from .tasks import question_set

    lines = []
    for k, q in enumerate(question_set(seed, n)):
        msgs = q.messages()
        for m in msgs:
            if isinstance(m.get("content"), list):
                for j, part in enumerate(m["content"]):
                    if part.get("type") == "image":
                        path = d / f"q{k}-{j}.png"
                        part["image"].save(path)
                        part["image"] = str(path)
        msgs.append({"role": "assistant", "content": q.answer})  # the answer tokens count too
        lines.append(json.dumps({"messages": msgs}, ensure_ascii=False))
    f = d / "tasks.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


def measure(ckpt: Path, n: int, seed: int, calib_seed: int, types: list[str], work: Path) -> list[dict]:
    from kimivl_edge.calibration import default_chats, read_chats
    from kimivl_edge.convert import convert_checkpoint
    from kimivl_edge.imatrix import DEFAULT_DATASET, collect
    from kimivl_edge.quant.imatrix_file import write_imatrix

    from .tasks import question_set

    text, mm = convert_checkpoint(ckpt, "f32", "f32", work / "f32", variant="instruct")
    tasks = _task_calibration(calib_seed, 100, work)
    matrices: dict[str, Path | None] = {"none": None}
    for name, chats, label in (("default", default_chats(), DEFAULT_DATASET),
                               ("tasks", read_chats(str(tasks)), str(tasks))):
        got = collect(text, mm, chats, label, n_threads=1)
        matrices[name] = work / f"{name}.imatrix.gguf"
        write_imatrix(matrices[name], got.imatrix)
        print(f"imatrix {name}: {got.n_chats} chats, {got.n_tokens} tokens ({got.n_image_tokens} image)",
              file=sys.stderr)
    qs = question_set(seed, n)
    ref = ReferenceData(ckpt, qs)
    rows = []
    for t in types:
        for name, im in matrices.items():
            out = work / f"{t}-{name}"
            q_text, q_mm = convert_checkpoint(ckpt, t, "q8_0", out, variant="instruct", imatrix=im)
            r = run_config(q_text, q_mm, qs, ref)
            r.update(text_type=t.upper(), imatrix=name, text_mb=q_text.stat().st_size / 1e6)
            rows.append(r)
            print(f"{t:8s} imatrix {name:8s} {r['text_mb']:.3f} MB  kld {r['kld']:.6f}  top1 {100 * r['top1']:.1f}%"
                  f"  acc {100 * r['accuracy']:.1f}%", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.imatrix_kld", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=4245, help="held-out questions (measured on)")
    ap.add_argument("--calib-seed", type=int, default=77, help="the task calibration questions")
    ap.add_argument("--types", default="q4_k_m,iq4_xs")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(a.ckpt, a.n, a.seed, a.calib_seed, a.types.split(","), Path(tmp))
    print("| text | imatrix | text MB | mean KLD | top-1 | accuracy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['text_type']} | {r['imatrix']} | {r['text_mb']:.3f} | {r['kld']:.6f} | {100 * r['top1']:.1f} % "
              f"| {100 * r['accuracy']:.1f} % |")
    if a.json:
        a.json.write_text(json.dumps({"n": a.n, "seed": a.seed, "calib_seed": a.calib_seed, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
