"""`kimivl-edge convert`: HF Kimi-VL checkpoint -> text GGUF + mmproj GGUF.

    kimivl-edge convert CHECKPOINT [--outtype f32|f16|bf16|q8_0|q4_0|q4_k_m|q5_k_m|q6_k|q4_k_edge|iq4_edge|iq4_xs|
                                              iq4_nl|iq3_s|iq3_xxs|iq2_xxs]
                        [--mmproj-type f32|f16|q8_0|q4_0] [--outdir DIR] [--variant V] [--imatrix FILE]
                        [--allow-nonfinite] [--dry-run]

CHECKPOINT is a directory or a Hugging Face repo id found in the local HF cache (no network). The files go to the
current directory unless --outdir says otherwise (never into the HF cache or the installed package).
"""
from __future__ import annotations

import sys

from .pipeline import MMPROJ_TYPES, TEXT_TYPES, convert_checkpoint, format_plan, format_result, plan_conversion


def main(argv: list[str] | None = None) -> int:
    from ..cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint directory or HF repo id (offline, from the HF cache)")
    ap.add_argument("--outtype", default="q8_0", type=str.lower, choices=TEXT_TYPES, metavar="TYPE",
                    help=f"text GGUF type: {', '.join(TEXT_TYPES)} (default q8_0)")
    ap.add_argument("--mmproj-type", default="f16", type=str.lower, choices=MMPROJ_TYPES, metavar="TYPE",
                    help=f"mmproj GGUF type: {', '.join(MMPROJ_TYPES)} (default f16)")
    ap.add_argument("--outdir", help="output directory (default: the current directory)")
    ap.add_argument("--variant", help="instruct, thinking or thinking-2506 (default: from the checkpoint's chat "
                                      "template, generation config, config name, README or directory name)")
    ap.add_argument("--allow-nonfinite", action="store_true",
                    help="convert weights that are NaN or Inf (listed) instead of refusing the checkpoint")
    ap.add_argument("--imatrix", metavar="FILE",
                    help="importance matrix (llama.cpp's GGUF imatrix, from `kimivl-edge imatrix`) for the K-quant "
                         "and IQ mixes; iq3_xxs and iq2_xxs require one")
    ap.add_argument("--threads", type=int, help="encoder threads (default: every core)")
    ap.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and sizes; write nothing")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    if args.dry_run:
        print(format_plan(plan_conversion(args.checkpoint, args.outtype, args.mmproj_type, args.outdir,
                                          args.variant, args.imatrix)))
        return 0
    print(format_result(convert_checkpoint(args.checkpoint, args.outtype, args.mmproj_type, args.outdir, args.variant,
                                           progress=sys.stderr.isatty(), threads=args.threads,
                                           allow_nonfinite=args.allow_nonfinite, imatrix=args.imatrix)))
    return 0
