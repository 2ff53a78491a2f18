"""Held-out accuracy of a checkpoint with the fp32 reference model, and the blind baseline.

    python -m training.evaluate kimivl_edge/assets/kimi-vl-tiny [--n 600] [--seed 1000]

Questions come from tasks.question_set with a seed the training never uses (training draws from
default_rng([seed, 1])). Answers are greedy (ReferenceModel.generate). The blind baseline asks the same questions
with every image replaced by a blank one of the same size and background: if the answers come through the vision
path, its accuracy is near chance (tasks.chance: 1/answers, or the shape's area for points).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from .tasks import TASKS, Question, chance, is_correct, question_set

EVAL_SEED = 1000
MAX_NEW_TOKENS = 12


def answer_all(model, questions: list[Question], blind: bool = False) -> list[str]:
    """Greedy answers of ``model`` (a ReferenceModel) to each question."""
    return [model.generate(q.messages(blank=blind), max_new_tokens=MAX_NEW_TOKENS) for q in questions]


def score(questions: list[Question], answers: list[str]) -> dict[str, float]:
    """Accuracy per task and "all" (the mean over questions)."""
    right: dict[str, list[bool]] = defaultdict(list)
    for q, a in zip(questions, answers):
        ok = is_correct(q, a)
        right[q.task].append(ok)
        right["all"].append(ok)
    return {t: sum(v) / len(v) for t, v in right.items()}


def chance_levels(questions: list[Question]) -> dict[str, float]:
    per: dict[str, list[float]] = defaultdict(list)
    for q in questions:
        c = chance(q)
        per[q.task].append(c)
        per["all"].append(c)
    return {t: sum(v) / len(v) for t, v in per.items()}


def evaluate(ckpt_dir: str | Path, n: int = 600, seed: int = EVAL_SEED, tasks: tuple[str, ...] = TASKS) -> dict:
    """{"reference": {task: acc}, "blind": {task: acc}, "chance": {task: acc}, "n": n} on ``n`` held-out questions."""
    from kimivl_edge.reference.model import ReferenceModel

    model = ReferenceModel(ckpt_dir)
    qs = question_set(seed, n, tasks)
    return {"n": n, "seed": seed,
            "reference": score(qs, answer_all(model, qs)),
            "blind": score(qs, answer_all(model, qs, blind=True)),
            "chance": chance_levels(qs)}


def format_table(result: dict) -> str:
    keys = [k for k in result["reference"] if k != "all"] + ["all"]
    lines = [f"{'task':8s} {'reference':>9s} {'blind':>7s} {'chance':>7s}"]
    for k in keys:
        lines.append(f"{k:8s} {100 * result['reference'][k]:8.1f}% {100 * result['blind'][k]:6.1f}% "
                     f"{100 * result['chance'][k]:6.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", help="checkpoint directory (HF layout)")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (cycled in this order)")
    args = ap.parse_args(argv)
    result = evaluate(args.ckpt, args.n, args.seed, tuple(args.tasks.split(",")))
    print(f"{args.n} held-out questions (seed {args.seed}), fp32 reference, greedy:")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
