"""Sections 2-3 of `kimivl-edge bench` (prefill, decode and the roofline) alone, on a given text GGUF.

    python -m kimivl_edge.bench.decode --model TEXT.gguf [--threads 2] [--runs 2] [--decode-tokens 32] [--out DIR]

The read bandwidth is measured once first (section 1's probe) and divides every row's bytes per token. Prints the
figures and writes DIR/decode.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from .harness import Children
from .probes import load_average
from .sections import decode_section, limits_section, roofline_section


def main(argv: list[str] | None = None) -> int:
    from ..cli import OneLineParser

    ap = OneLineParser(prog="python -m kimivl_edge.bench.decode")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("build/bench-decode"))
    args = ap.parse_args(argv)
    if not args.model.is_file():
        ap.error(f"{args.model}: no such file")
    if args.threads < 1 or args.runs < 1 or args.decode_tokens < 1:
        ap.error("--threads, --runs and --decode-tokens must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    ch = Children(args.out, args.threads)
    r: dict = {"load_average": load_average(), "threads": args.threads, "limits": limits_section(ch, args.runs)}
    r["decode"] = decode_section(ch, args.model, args.runs, args.decode_tokens)
    r["roofline"] = roofline_section(args.model, r["decode"], r["limits"]["read_bandwidth_bytes_per_s"]["median"])
    (args.out / "decode.json").write_text(json.dumps(r, indent=2) + "\n")
    rf = r["roofline"]
    print(f"read bandwidth {rf['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"{rf['bytes_per_token']['total'] / 1e9:.3f} GB per token, ceiling {rf['ceiling_tokens_per_s']:.2f} tok/s; "
          f"load mode {r['decode']['load_mode']}")
    for k, v in r["decode"]["methods"].items():
        print(f"{k}: prefill {v['prefill_tokens_per_s']['median']:.1f} tok/s, decode "
              f"{v['decode_tokens_per_s']['median']:.2f} tok/s ({100 * rf['fraction_of_ceiling'][k]:.0f} % of the "
              "ceiling)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
