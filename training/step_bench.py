"""Training step time, side by side in one process: the vision tower on size groups (``train.size_groups``) against
one group padded to the longest image, on the same full-mix batches (forward and backward of the answer loss).

    python -m training.step_bench [--batches 12] [--variant instruct]

Prints both times, their ratio and the largest relative difference of the image-token rows (the groups change only
the summation order).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import train as T


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.step_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--variant", choices=("instruct", "thinking"), default="instruct")
    args = ap.parse_args(argv)
    T.setup_torch(1)
    cfg, enc, w = T.starting_point(0, args.variant)
    for n, t in w.items():
        t.requires_grad_(T.is_trainable(n))
    data = T.training_examples(enc, 0, args.batches * T.BATCH, curriculum=1e-6, single_first=0.0)  # the full mix
    pad = enc.tokenizer.id_of("[PAD]")
    spent = {"groups": 0.0, "one group": 0.0}
    diff = 0.0
    for k in range(args.batches):
        batch = T.collate([next(data) for _ in range(T.BATCH)], pad)
        rows = {}
        order = ("groups", "one group") if k % 2 else ("one group", "groups")  # alternate who runs first
        for name in order:
            t0 = time.perf_counter()
            emb = T.vision_forward(w, cfg.vision, batch.pixel_values, batch.grids,
                                   T.GROUP_SPREAD if name == "groups" else float("inf"))
            T.answer_loss(w, cfg, batch, emb=emb).backward()
            spent[name] += time.perf_counter() - t0
            rows[name] = emb.detach()
        diff = max(diff, float((rows["groups"] - rows["one group"]).abs().max() / rows["one group"].abs().max()))
    per = {k: v / args.batches for k, v in spent.items()}
    print(f"{args.batches} batches of {T.BATCH} chats ({args.variant}), forward + backward per batch: size groups "
          f"{per['groups']:.3f} s, one group {per['one group']:.3f} s: {per['one group'] / per['groups']:.2f}x faster; "
          f"image rows differ by at most {diff:.1e} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
