"""Held-out accuracy of a trained checkpoint, and the blind baseline.

    python -m training.evaluate kimivl_edge/assets/kimi-vl-tiny [--n 600] [--seed 1000] [--engine runtime]
    python -m training.evaluate kimivl_edge/assets/kimi-vl-tiny-thinking --n 600

Questions come from tasks.question_set with a seed the training never uses (training draws from
default_rng([seed, 1])). Answers are greedy: by default through the runtime on the checkpoint converted to F32
(text and mmproj; numpy vision, llama.cpp decoder with an F32 KV cache: the fp32 model up to llama.cpp's 1e-5 norm
epsilon, docs/model.md), or with ``--engine reference`` by the torch reference (``text.greedy_generate``, which
recomputes the whole sequence per token: fine for short answers, far slower for a Thinking model's). The blind
baseline asks the same questions with every image replaced by a blank one of the same size and background: if the
answers come through the vision path, its accuracy is near chance (tasks.chance). A Thinking checkpoint (its
config names it) is also asked with the thinking cut off, the assistant turn pre-filled with ◁think▷, two newlines
and ◁/think▷ (what VLMEvalKit does to turn thinking off); its answer is the text after ◁/think▷
(``prompt.split_thinking``, as the runtime splits). Ground and box questions also report the mean distance, in
pixels of the original image, from the answer's point (or box centre) to the named shape's centre.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from kimivl_edge.prompt import THINK_CLOSE, THINK_OPEN, split_thinking

from .tasks import TASKS, Question, chance, ground_distance, is_correct, question_set

EVAL_SEED = 1000
MAX_NEW_TOKENS = 48  # the longest answer (a bbox_2d) is under 40 tokens
MAX_THINKING_TOKENS = 160  # thought (up to ~100 tokens for five pages) and answer
THINKING_OFF = f"{THINK_OPEN}\n\n{THINK_CLOSE}"


def is_thinking(model) -> bool:
    """Whether a ReferenceModel's checkpoint is a Thinking variant (its config's name, as the converter decides)."""
    from kimivl_edge.convert.variant import detect_variant

    return detect_variant(model.ckpt.path, None)[0] != "instruct"


def max_tokens(thinking: bool) -> int:
    return MAX_THINKING_TOKENS if thinking else MAX_NEW_TOKENS


def answer_one(model, q: Question, blind: bool = False, thinking: bool = False, prefill: str = "") -> str:
    """The greedy answer of ``model`` (a ReferenceModel or a KimiVL) to ``q``: the text after ◁/think▷ for a
    thinking model; ``prefill`` starts the assistant turn (the runtime's assistant prefill)."""
    n = max_tokens(thinking and not prefill)
    msgs = q.messages(blank=blind)
    if not hasattr(model, "prepare"):  # the runtime
        if prefill:
            msgs.append({"role": "assistant", "content": prefill})
        text = model.generate(msgs, temperature=0, max_tokens=n).text
    else:
        p = model.prepare(msgs)
        if prefill:
            p.input_ids = p.input_ids + model.tokenizer.encode(prefill)
        text = model.decode_answer(model.generate_ids(p, n))
    return split_thinking(prefill + text)[1] if thinking else text


def answer_all(model, questions: list[Question], blind: bool = False, thinking: bool = False,
               prefill: str = "") -> list[str]:
    return [answer_one(model, q, blind, thinking, prefill) for q in questions]


@contextmanager
def open_model(ckpt_dir: str | Path, engine: str = "runtime"):
    """(model, thinking): the torch reference, or the runtime on the checkpoint converted to F32."""
    if engine == "reference":
        import torch

        from kimivl_edge.reference.model import ReferenceModel

        torch.set_num_threads(1)  # tiny matrices: more threads only oversubscribe the cores
        ref = ReferenceModel(ckpt_dir)
        yield ref, is_thinking(ref)
        return
    from kimivl_edge.convert import convert_checkpoint
    from kimivl_edge.model import KimiVL

    with tempfile.TemporaryDirectory() as tmp:
        res = convert_checkpoint(Path(ckpt_dir), "f32", "f32", Path(tmp))
        with KimiVL.load(res.text_path, res.mmproj_path, kv_type="f32", n_ctx=2048, n_threads=1) as m:
            yield m, m.info.is_thinking


def score(questions: list[Question], answers: list[str]) -> dict[str, float]:
    """Accuracy per task and "all" (the mean over questions)."""
    right: dict[str, list[bool]] = defaultdict(list)
    for q, a in zip(questions, answers):
        ok = is_correct(q, a)
        right[q.task].append(ok)
        right["all"].append(ok)
    return {t: sum(v) / len(v) for t, v in right.items()}


def distances(questions: list[Question], answers: list[str]) -> dict[str, float | None]:
    """Mean distance (pixels of the original image) per grounding task, over the answers that parse; None if none
    parse."""
    per: dict[str, list[float]] = defaultdict(list)
    tasks = {q.task for q in questions if q.task in ("ground", "box")}
    for q, a in zip(questions, answers):
        d = ground_distance(q, a) if q.task in tasks else None
        if d is not None:
            per[q.task].append(d)
    return {t: (sum(per[t]) / len(per[t]) if per[t] else None) for t in sorted(tasks)}


def chance_levels(questions: list[Question]) -> dict[str, float]:
    per: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        c = chance(q)
        per[q.task].append(c)
        per["all"].append(c)
    return {t: sum(v) / len(v) for t, v in per.items()}


def evaluate(ckpt_dir: str | Path, n: int = 600, seed: int = EVAL_SEED, tasks: tuple[str, ...] = TASKS,
             engine: str = "runtime") -> dict:
    """{"reference": {task: acc}, "blind": ..., "chance": ..., "distance": {task: px}, "n": n, "thinking": bool}
    on ``n`` held-out questions; a thinking checkpoint adds "no_thinking" (the thinking cut off)."""
    qs = question_set(seed, n, tasks)
    with open_model(ckpt_dir, engine) as (model, thinking):
        answers = answer_all(model, qs, thinking=thinking)
        out = {"n": n, "seed": seed, "engine": engine, "thinking": thinking, "reference": score(qs, answers),
               "distance": distances(qs, answers)}
        if thinking:
            off = answer_all(model, qs, thinking=True, prefill=THINKING_OFF)
            out["no_thinking"] = score(qs, off)
            out["no_thinking_distance"] = distances(qs, off)
        out["blind"] = score(qs, answer_all(model, qs, blind=True, thinking=thinking))
    out["chance"] = chance_levels(qs)
    return out


def format_table(result: dict) -> str:
    keys = [k for k in result["reference"] if k != "all"] + ["all"]
    cols = ["reference"] + (["no_thinking"] if "no_thinking" in result else []) + ["blind", "chance"]
    names = {"reference": "thinking" if result.get("thinking") else "answer", "no_thinking": "cut off"}
    lines = ["| task | " + " | ".join(names.get(c, c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in keys:
        cells = [f"{100 * result[c][k]:.1f} %" for c in cols]
        d = result["distance"].get(k)
        if d is not None:
            cells[0] += f" ({d:.1f} px)"
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="checkpoint directory (HF layout)")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (cycled in this order)")
    ap.add_argument("--engine", choices=("runtime", "reference"), default="runtime",
                    help="runtime: the F32 GGUF pair through kimivl_edge; reference: the torch reference")
    ap.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = ap.parse_args(argv)
    result = evaluate(args.ckpt, args.n, args.seed, tuple(args.tasks.split(",")), args.engine)
    print(f"{args.n} held-out questions (seed {args.seed}), {args.engine} (fp32), greedy:")
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
