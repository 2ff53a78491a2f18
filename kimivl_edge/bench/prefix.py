"""Section 7 of `kimivl-edge bench` (the prefix cache) alone, on a given GGUF pair.

    python -m kimivl_edge.bench.prefix [--model TEXT.gguf --mmproj MMPROJ.gguf] [--threads 1] [--runs 3] [--out DIR]

Without --model the bundled tiny checkpoint is converted (Q4_K_M text, Q8_0 mmproj, as the bench uses) under
--out. Prints the section's table and writes DIR/prefix.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .harness import Children, pair_or_bundled
from .report import _prefix
from .sections import prefix_section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimivl_edge.bench.prefix")
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="build/bench-prefix")
    args = ap.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    text, mm = pair_or_bundled(args.model, args.mmproj, root)
    r = {"prefix_cache": prefix_section(Children(root, args.threads), text, mm, root, args.runs)}
    (root / "prefix.json").write_text(json.dumps(r, indent=2) + "\n")
    print("\n".join(_prefix(r)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
