"""Accuracy of every quantization of the trained tiny models, against the fp32 reference (issue 5's table).

    .venv/bin/python -m training.quant_table [--variants instruct,thinking] [--n 300] [--n-thinking 60] [--out docs]

For each text type (F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_EDGE without an imatrix, Q4_0) x mmproj type (F16,
Q8_0, Q4_0), converted by our CLI code and run through our runtime (numpy vision, llama.cpp decoder, F32 KV cache so
only the weights differ), on the held-out questions (training.evaluate's seed):
  - file sizes; task accuracy (greedy answers, training.tasks.is_correct);
  - mean KL divergence KL(reference || quantized) and top-1 agreement of the next-token distributions, teacher-forced
    over the reference answer tokens and the end-of-turn token;
  - vision per-token cosine of the projected image embeddings vs the reference.
One more row runs llama.cpp's own vision path (ggml backend) on the Q8_0 text + F16 mmproj.
The Thinking model answers with its thinking (up to evaluate.MAX_THINKING_TOKENS); its accuracy is its answer's
(after ◁/think▷) and its KLD covers the thinking tokens too. Writes OUT/quant-accuracy.md and .json (both
variants) and quant-accuracy.png / quant-accuracy-thinking.png (accuracy and KLD against total size).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from kimivl_edge.quant.metrics import cosine_rows, kl_divergence

TEXT_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_edge", "q4_0")
MMPROJ_TYPES = ("f16", "q8_0", "q4_0")
ASSETS = Path(__file__).resolve().parent.parent / "kimivl_edge" / "assets"
CKPTS = {"instruct": ASSETS / "kimi-vl-tiny", "thinking": ASSETS / "kimi-vl-tiny-thinking"}
DEFAULT_CKPT = CKPTS["instruct"]


class ReferenceData:
    """What the fp32 model says about each question: its greedy answer (the checkpoint converted to F32, through the
    runtime: the torch reference recomputes the whole sequence per token, too slow for a Thinking model's thinking),
    and the torch reference's teacher-forced logits over that answer and its image embeddings."""

    def __init__(self, ckpt: Path, questions):
        import torch

        from kimivl_edge.reference.model import ReferenceModel

        from .evaluate import max_tokens, open_model

        torch.set_num_threads(1)  # tiny matrices: more threads only oversubscribe the cores
        with open_model(ckpt, "runtime") as (m, thinking):
            self.thinking = thinking
            self.max_tokens = max_tokens(thinking)
            answers = [m.generate(q.messages(), temperature=0, max_tokens=self.max_tokens).tokens
                       for q in questions]
        self.model = ref = ReferenceModel(ckpt)
        self.answer_ids, self.logits, self.embeds = [], [], []
        for q, ids in zip(questions, answers):
            p = ref.prepare(q.messages())
            forced = list(ids) + [ref.tokenizer.im_end_id]
            p.input_ids = p.input_ids + forced
            full = ref.logits(p).double().numpy()
            self.answer_ids.append(forced)
            self.logits.append(full[-len(forced) - 1: -1])  # the positions that predict each forced token
            self.embeds.append(ref.image_embeds(p.pixel_values, p.grid_hws).numpy())


def run_config(text: Path, mmproj: Path, questions, ref: ReferenceData, backend: str = "numpy") -> dict:
    from kimivl_edge.model import KimiVL

    from .tasks import is_correct

    kls, top1, cos, right = [], [], [], []

    with KimiVL.load(text, mmproj, kv_type="f32", n_ctx=1024, vision_backend=backend, n_threads=1) as m:
        for q, forced, rlog, remb in zip(questions, ref.answer_ids, ref.logits, ref.embeds):
            msgs = q.messages()
            out = m.generate(msgs, temperature=0, max_tokens=ref.max_tokens)
            right.append(is_correct(q, out.answer))
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

    from kimivl_edge.prompt import split_thinking

    from .evaluate import EVAL_SEED
    from .tasks import is_correct, question_set

    qs = question_set(EVAL_SEED if seed is None else seed, n)
    ref = ReferenceData(ckpt, qs)
    tok = ref.model.tokenizer
    answers = [tok.decode(a[:-1]) for a in ref.answer_ids]
    if ref.thinking:
        answers = [split_thinking(a)[1] for a in answers]
    ref_acc = float(np.mean([is_correct(q, a) for q, a in zip(qs, answers)]))
    rows = []
    for t in text_types:
        for mt in mmproj_types:
            text, mm = convert_checkpoint(ckpt, t, mt, workdir / f"{t}-{mt}")
            r = run_config(text, mm, qs, ref)
            r.update(text_type=t.upper(), mmproj_type=mt.upper(), backend="numpy",
                     text_mb=text.stat().st_size / 1e6, mmproj_mb=mm.stat().st_size / 1e6)
            rows.append(r)
            print(f"{t:7s} {mt:5s} acc {100 * r['accuracy']:5.1f}%  kld {r['kld']:.5f}  top1 {100 * r['top1']:5.1f}%  "
                  f"cos {r['vision_cos_mean']:.5f}", file=sys.stderr)
    if ggml_row:
        text, mm = convert_checkpoint(ckpt, "q8_0", "f16", workdir / "ggml")
        r = run_config(text, mm, qs, ref, backend="ggml")
        r.update(text_type="Q8_0", mmproj_type="F16", backend="ggml (llama.cpp clip)",
                 text_mb=text.stat().st_size / 1e6, mmproj_mb=mm.stat().st_size / 1e6)
        rows.append(r)
    return {"n": n, "checkpoint": str(ckpt), "variant": "thinking" if ref.thinking else "instruct",
            "reference_accuracy": ref_acc, "rows": rows}


def markdown(tables: dict[str, dict]) -> str:
    """The page for one table per variant ({"instruct": table, "thinking": table})."""
    ns = {v: t["n"] for v, t in tables.items()}
    flags = f"--n {ns.get('instruct', 300)}" + (f" --n-thinking {ns['thinking']}" if "thinking" in ns else "")
    lines = [
        "# Accuracy of every quantization (trained tiny Kimi-VL models)",
        "",
        f"Regenerate: `.venv/bin/python -m training.quant_table {flags}` (held-out questions per model: "
        + ", ".join(f"{v} {n}" for v, n in ns.items()) + "; the Thinking model thinks before every answer, so fewer). "
        "The "
        "fp32 accuracy is the F32 GGUF pair's greedy answers (the same model up to llama.cpp's norm epsilon); KL "
        "divergence and top-1 agreement are teacher-forced over those answer tokens (for Thinking, its "
        "thinking and its answer) and the end-of-turn token; F32 KV cache. IQ4_EDGE (here without an imatrix) was "
        "chosen on the first 100 questions of the previous Instruct model (`training.quant_frontier --search`); its "
        "figures on questions it was not chosen on are in [quant-frontier.md](quant-frontier.md).",
    ]
    for variant, table in tables.items():
        png = "quant-accuracy.png" if variant == "instruct" else f"quant-accuracy-{variant}.png"
        lines += [
            "",
            f"## {variant.title()} ({Path(table['checkpoint']).name}, {table['n']} questions): fp32 accuracy "
            f"{100 * table['reference_accuracy']:.1f} %",
            "",
            "| text | mmproj | vision backend | text MB | mmproj MB | accuracy | mean KLD | top-1 "
            "| vision cos (mean / min) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table["rows"]:
            lines.append(f"| {r['text_type']} | {r['mmproj_type']} | {r['backend']} | {r['text_mb']:.2f} | "
                         f"{r['mmproj_mb']:.2f} | {100 * r['accuracy']:.1f} % | {r['kld']:.5f} | "
                         f"{100 * r['top1']:.1f} % | {r['vision_cos_mean']:.5f} / {r['vision_cos_min']:.4f} |")
        lines += ["", f"![{variant}: accuracy and KL divergence against total size]({png})"]
    return "\n".join(lines) + "\n"


MMPROJ_STYLE = {"F16": ("tab:blue", "o"), "Q8_0": ("tab:green", "s"), "Q4_0": ("tab:red", "^")}


def figure(table: dict):
    """Accuracy and mean KLD (log scale) against the pair's total size, one marker per mmproj type and one colour
    per text type in the legends (no labels next to points, so none overlap). Needs matplotlib (the ``docs``
    extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r["backend"] == "numpy"]
    text_types = list(dict.fromkeys(r["text_type"] for r in rows))
    colours = dict(zip(text_types, plt.get_cmap("tab10").colors))
    fig, (acc, kld) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for r in rows:
        size = r["text_mb"] + r["mmproj_mb"]
        marker = MMPROJ_STYLE.get(r["mmproj_type"], ("black", "x"))[1]
        style = {"color": colours[r["text_type"]], "marker": marker, "s": 36}
        acc.scatter(size, 100 * r["accuracy"], **style)
        kld.scatter(size, r["kld"], **style)
    acc.axhline(100 * table["reference_accuracy"], color="grey", lw=0.8, ls="--", label="fp32 reference")
    acc.set(xlabel="text + mmproj GGUF size (MB)", ylabel="held-out accuracy (%)",
            title=f"{table.get('variant', 'instruct').title()}: task accuracy, {table['n']} questions")
    kld.set_yscale("log")
    kld.set(xlabel="text + mmproj GGUF size (MB)", ylabel="mean KL divergence to fp32 (nats, log scale)",
            title="next-token KL divergence")
    for ax in (acc, kld):
        ax.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D

    text_handles = [Line2D([], [], ls="", marker="o", color=c, label=f"text {t}") for t, c in colours.items()]
    mm_handles = [Line2D([], [], ls="", marker=m, color="black", label=f"mmproj {t}")
                  for t, (_, m) in MMPROJ_STYLE.items() if any(r["mmproj_type"] == t for r in rows)]
    acc.legend(handles=[*acc.get_legend_handles_labels()[0], *mm_handles], loc="best", fontsize=8)
    kld.legend(handles=text_handles, loc="best", fontsize=8, ncol=2)
    return fig


def save_png(fig, path: Path) -> None:
    """A docs chart written as a PNG (110 dpi) and closed."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart(table: dict, path: Path) -> None:
    """``figure`` written as a PNG."""
    save_png(figure(table), path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.quant_table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="instruct,thinking", help="comma-separated: instruct, thinking")
    ap.add_argument("--n", type=int, default=300, help="held-out questions for the Instruct model")
    ap.add_argument("--n-thinking", type=int, default=60, help="held-out questions for the Thinking model")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            tables[variant] = build_table(CKPTS[variant], args.n_thinking if variant == "thinking" else args.n,
                                          Path(tmp))
        png = "quant-accuracy.png" if variant == "instruct" else f"quant-accuracy-{variant}.png"
        chart(tables[variant], args.out / png)
    (args.out / "quant-accuracy.json").write_text(json.dumps(tables, indent=2) + "\n")
    (args.out / "quant-accuracy.md").write_text(markdown(tables))
    print(markdown(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
