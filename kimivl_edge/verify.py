"""`kimivl-edge verify`: is a converted GGUF pair faithful to its checkpoint? Compared with the fp32 reference.

    kimivl-edge verify CHECKPOINT -m MODEL.gguf [--mmproj MMPROJ.gguf] [--image PATH ...] [--prompts FILE.jsonl]
                       [--max-new-tokens N] [--threads N] [--json OUT]

Both sides get the same token ids and the same preprocessed pixels (rendered by our runtime from the GGUF's chat
template); only the weights and their arithmetic differ. The reference is the layer-streaming fp32 one
(``reference.streaming``): one layer's float32 weights in memory at a time. Per image: per-token cosine of the
projected embeddings (mean, min, 1st percentile). Per prompt, teacher-forced over the reference's own greedy
continuation (row 0 is the position right after the prompt): mean and max KL(reference || file), top-1
agreement, top-5 overlap. One verdict line per file against the bounds of its type (``TEXT_BOUNDS``,
``MMPROJ_BOUNDS``). Exit code 0 when every file passes, 1 when one fails, 2 on bad input.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import KimiVLError, UsageError
from .quant.metrics import cosine_rows, kl_divergence, top1_agreement

if TYPE_CHECKING:
    from .model import KimiVL
    from .reference.streaming import StreamingReference

INSTALL = "pip install 'kimivl-edge[reference]'"
MAX_IMAGE_PATCHES = 1024  # images above this are resized (both sides): bounds the reference's attention memory

# File type -> (mean KLD <=, top-1 agreement >=, top-5 overlap >=), teacher-forced over prompt + continuation.
# Set at about 3x what this command measured on an earlier trained tiny Instruct asset (the current one measures
# lower: Q8_0 0.0075, IQ4_EDGE 0.015; README, "verify") with the default prompts, whose text (other languages) is
# far outside what that model learned, so its predictions there are uncertain and sensitive: F16 9e-07, Q8_0 0.012,
# Q6_K 0.077, Q4_K_M 0.18, Q4_0 0.19 (docs/quant-accuracy.md measures answer tokens only: Q8_0 0.00014, Q4_K_M
# 0.0021). Two experts swapped in a Q8_0 file measure 0.45 (0.15 on the current asset).
# The IQ mixes, with an imatrix from the default calibration set (`kimivl-edge imatrix`), KLD mean / top-1 / top-5
# (their floors about 5 and 7 points below): IQ4_XS 0.198 / 76.0 % / 86.5 %, IQ4_NL 0.199 / 71.7 / 85.6, IQ3_S
# 0.435 / 59.3 / 77.3, IQ3_XXS 0.495 / 60.7 / 74.7, IQ2_XXS 1.27 / 37.9 / 58.3; IQ4_EDGE 0.061 / 90.6 / 93.2, without
# an imatrix 0.078 / 87.0 / 92.6. The 3-bit and 2-bit bounds are above what two swapped experts measure.
TEXT_BOUNDS: dict[str, tuple[float, float, float]] = {
    "F32": (1e-4, 0.99, 0.98), "F16": (1e-3, 0.98, 0.95), "BF16": (2e-3, 0.98, 0.95),
    "Q8_0": (0.04, 0.93, 0.93), "Q6_K": (0.2, 0.82, 0.88), "Q5_K_M": (0.3, 0.78, 0.85),
    "Q4_K_M": (0.5, 0.7, 0.8), "Q4_K_EDGE": (0.5, 0.7, 0.8), "Q4_0": (0.5, 0.7, 0.78),
    "IQ4_EDGE": (0.25, 0.82, 0.85), "IQ4_XS": (0.6, 0.71, 0.79), "IQ4_NL": (0.6, 0.66, 0.78),
    "IQ3_S": (1.3, 0.54, 0.7), "IQ3_XXS": (1.5, 0.55, 0.67), "IQ2_XXS": (3.8, 0.32, 0.51),
}
# mmproj type -> (mean cosine >=, 1st-percentile cosine >=). docs/quant-accuracy.md: F16 1.00000 / min 1.0000,
# Q8_0 0.99999 / 1.0000, Q4_0 0.99769 / min 0.9924.
MMPROJ_BOUNDS: dict[str, tuple[float, float]] = {
    "F32": (0.99999, 0.9999), "F16": (0.9999, 0.999), "BF16": (0.9995, 0.998), "Q8_0": (0.999, 0.995),
    "Q4_0": (0.99, 0.97),
}
LOOSEST_TEXT, LOOSEST_MMPROJ = TEXT_BOUNDS["Q4_0"], MMPROJ_BOUNDS["Q4_0"]

DEFAULT_PROMPTS = (
    "Write three short sentences about the sea.",
    "请用两句话介绍一下长城。",
    # decomposed accents: e + U+0301 COMBINING ACUTE, a + U+0300 COMBINING GRAVE, n + U+0303 COMBINING TILDE
    "Le cafe\u0301 de ma grand-me\u0300re e\u0301tait tre\u0300s bon; et l'e\u0301te\u0301 a\u0300 Espan\u0303a ?",
    "नमस्ते! क्या आप मुझे हिंदी में एक छोटी कहानी सुना सकते हैं?",
)
THINKING_PROMPT = ("A train leaves at 14:10 and arrives at 17:45. How long is the trip? Think it through step by "
                   "step before you answer.")
IMAGE_PROMPT = "Describe this image."
# (width, height): all need padding to multiples of 28; 640x480 has 1530 > MAX_IMAGE_PATCHES patches: resized.
DEFAULT_IMAGE_SIZES = ((61, 47), (150, 400), (640, 480))


# -- inputs -----------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One prompt: a chat, and the images in it (in order)."""

    name: str
    messages: list[dict]
    images: list[Any] = field(default_factory=list)


def default_image(w: int, h: int, seed: int):
    """A deterministic picture: a colour gradient with a few rectangles and discs on it."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 0 * x], axis=-1)
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        box = (x0, y0, x0 + int(rng.integers(4, w // 2 + 5)), y0 + int(rng.integers(4, h // 2 + 5)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    return img


def chat(text: str, images: Sequence[Any] = ()) -> list[dict]:
    from .prompt import user_message

    return [user_message(text, list(images))]


def default_cases(thinking: bool) -> list[Case]:
    cases = [Case(f"prompt {k + 1}", chat(p)) for k, p in enumerate(DEFAULT_PROMPTS)]
    if thinking:
        cases.append(Case("thinking", chat(THINKING_PROMPT)))
    for k, (w, h) in enumerate(DEFAULT_IMAGE_SIZES):
        img = default_image(w, h, seed=k)
        cases.append(Case(f"image {w}x{h}", chat(IMAGE_PROMPT, [img]), [img]))
    return cases


def read_prompts(path: str) -> list[Case]:
    """JSONL: one object a line, {"prompt": TEXT, "images": [PATH, ...]} or {"messages": [...]}."""
    from .prompt import image_parts

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts {path}: cannot read ({e.__class__.__name__})") from None
    cases = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"--prompts {path} line {n}: not JSON") from None
        if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            msgs = obj["messages"]
            cases.append(Case(f"line {n}", msgs, [p.get("image", p.get("image_url")) for p in image_parts(msgs)]))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            images = obj.get("images", [])
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise UsageError(f"--prompts {path} line {n}: \"images\" must be a list of paths")
            cases.append(Case(f"line {n}", chat(obj["prompt"], images), images))
        else:
            raise UsageError(f"--prompts {path} line {n}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}}")
    if not cases:
        raise UsageError(f"--prompts {path}: no prompts")
    return cases


def choose_cases(prompts: str | None, images: Sequence[str], thinking: bool) -> list[Case]:
    if prompts is None and not images:
        return default_cases(thinking)
    cases = read_prompts(prompts) if prompts is not None else []
    return cases + [Case(f"image {Path(p).name}", chat(IMAGE_PROMPT, [p]), [p]) for p in images]


# -- metrics ----------------------------------------------------------------------------------------------------

def image_metrics(test: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Per-token cosine of embedding rows: mean, min and 1st percentile (numpy's linear interpolation)."""
    cos = cosine_rows(test, ref)
    return {"tokens": int(cos.size), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "cos_p1": float(np.percentile(cos, 1))}


def top_k_overlap(test_logits: np.ndarray, ref_logits: np.ndarray, k: int = 5) -> float:
    """Mean over rows of |top-k(test) ∩ top-k(ref)| / k."""
    a = np.argpartition(-np.asarray(test_logits, np.float64), k - 1, axis=-1)[..., :k]
    b = np.argpartition(-np.asarray(ref_logits, np.float64), k - 1, axis=-1)[..., :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def logit_metrics(test: np.ndarray, ref: np.ndarray, rows: np.ndarray | None = None,
                  chunk: int = 64) -> dict[str, float]:
    """KL(ref || test) per row (mean, max), top-1 agreement and top-5 overlap of the next-token distributions,
    over ``rows`` (all by default), ``chunk`` rows at a time: float64 copies of a 163840-token vocabulary are 1.3 MB
    a row."""
    idx = np.arange(len(ref)) if rows is None else np.asarray(rows)
    kld, top1, top5 = [], 0.0, 0.0
    for a in range(0, len(idx), chunk):
        t, r = test[idx[a:a + chunk]], ref[idx[a:a + chunk]]
        kld.append(kl_divergence(t, r))
        top1 += top1_agreement(t, r) * len(r)
        top5 += top_k_overlap(t, r) * len(r)
    k = np.concatenate(kld)
    return {"positions": int(k.size), "kld_mean": float(k.mean()), "kld_max": float(k.max()),
            "top1": top1 / k.size, "top5": top5 / k.size}


def pooled(rows: Sequence[dict[str, float]], weight: str) -> dict[str, float]:
    """Per-case metrics pooled over cases: means weighted by ``weight`` (tokens/positions); ``_max`` the highest,
    ``_min`` and ``_p1`` the lowest of the cases (for the 1st percentile: the worst case's, a conservative figure)."""
    w = np.array([r[weight] for r in rows], np.float64)
    out: dict[str, float] = {weight: int(w.sum())}
    for key in rows[0]:
        if key == weight:
            continue
        vals = np.array([r[key] for r in rows], np.float64)
        out[key] = float(vals.max() if key.endswith("_max") else vals.min() if key.endswith(("_min", "_p1"))
                         else (vals * w).sum() / w.sum())
    return out


# -- verdicts ---------------------------------------------------------------------------------------------------

def file_type(path: str) -> str:
    """The file's recipe name: ours (kimivl_edge.file_type) or llama.cpp's general.file_type, e.g. "Q8_0"."""
    from gguf import LlamaFileType

    from .gguf_file import read_metadata
    from .gguf_keys import EdgeKeys

    meta = read_metadata(path)
    if EdgeKeys.FILE_TYPE in meta:
        return str(meta[EdgeKeys.FILE_TYPE]).upper()
    try:
        return LlamaFileType(int(meta["general.file_type"])).name.removeprefix("MOSTLY_").replace("ALL_", "")
    except (KeyError, ValueError, TypeError):
        return "unknown"


def text_verdict(m: dict[str, float], ftype: str) -> tuple[bool, str]:
    kld, top1, top5 = TEXT_BOUNDS.get(ftype, LOOSEST_TEXT)
    ok = bool(np.isfinite(m["kld_mean"]) and m["kld_mean"] <= kld and m["top1"] >= top1 and m["top5"] >= top5)
    return ok, f"bounds: KLD mean <= {kld:g}, top-1 >= {100 * top1:g} %, top-5 >= {100 * top5:g} %"


def mmproj_verdict(m: dict[str, float], ftype: str) -> tuple[bool, str]:
    mean, p1 = MMPROJ_BOUNDS.get(ftype, LOOSEST_MMPROJ)
    ok = bool(np.isfinite(m["cos_mean"]) and m["cos_mean"] >= mean and m["cos_p1"] >= p1)
    return ok, f"bounds: cos mean >= {mean:g}, 1st percentile >= {p1:g}"


# -- the run ----------------------------------------------------------------------------------------------------

def check_pair(model: KimiVL, ref: StreamingReference) -> None:
    t = ref.config.text
    if (model.info.n_vocab, model.info.n_embd) != (t.vocab_size, t.hidden_size):
        raise UsageError(f"the GGUF ({model.info.n_vocab} tokens, width {model.info.n_embd}) was not converted from "
                         f"this checkpoint ({t.vocab_size} tokens, width {t.hidden_size})")


def run(model: KimiVL, ref: StreamingReference, cases: Sequence[Case], max_new_tokens: int,
        say: Callable[[str], None]) -> dict:
    """Render every case, run the reference (one vision pass, then greedy decoder passes), compare the file."""
    import torch

    from .decoder import ImageBlock
    from .prompt import expand_media

    check_pair(model, ref)
    rendered = [model.render_prompt(c.messages) for c in cases]
    images = [im for r in rendered for im in r.images]
    ref_rows: list[torch.Tensor] = []
    if images:
        packed = ref.encode_images(np.concatenate([im.patches for im in images]), [im.grid for im in images])
        ref_rows = list(packed.split([im.n_rows for im in images]))
    it = iter(ref_rows)
    prompts = []
    for r in rendered:
        mine = [next(it) for _ in r.images]
        ids = expand_media(r.ids, r.media_pad_id, [im.n_rows for im in r.images])
        prompts.append((ids, torch.cat(mine) if mine else None))
    all_segments = [model.embed_prompt(r) for r in rendered]  # the image rows are what the decoder receives
    stops = sorted(model.tokenizer.stop_ids)
    greedy = ref.greedy(prompts, max_new_tokens, stops, file_draft(model, all_segments, set(stops)))

    image_rows, prompt_rows = [], []
    it = iter(ref_rows)
    for case, r, (ids, _), (cont, states), segments in zip(cases, rendered, prompts, greedy, all_segments):
        for k, rows in enumerate(s.rows for s in segments if isinstance(s, ImageBlock)):
            row = {"case": case.name, "image": k, **image_metrics(rows, next(it).double().numpy())}
            say(f"  {case.name}, image {k + 1}: {row['tokens']} tokens, cos mean {row['cos_mean']:.6f} "
                f"min {row['cos_min']:.6f} p1 {row['cos_p1']:.6f}")
            image_rows.append(row)
        m = compare_logits(model, segments, cont, ref.head([states])[0].numpy(), [*ids, *cont],
                           r.media_pad_id)
        say(f"  {case.name}: {m['positions']} positions, KLD mean {m['kld_mean']:.3g} max {m['kld_max']:.3g}, "
            f"top-1 {100 * m['top1']:.1f} %, top-5 {100 * m['top5']:.1f} %")
        prompt_rows.append({"case": case.name, "continuation": cont, **m})
    say(f"  reference: {ref.passes} decoder pass(es) over the checkpoint's layers for {max_new_tokens} new "
        "tokens (the file's greedy tokens proposed, the reference's kept)")
    return {"images": image_rows, "prompts": prompt_rows, "reference_passes": ref.passes}


def file_draft(model: KimiVL, segments: list[list], stops: set[int]) -> Callable[[int, list[int], int], list[int]]:
    """The file's own greedy tokens after prompt ``k`` + ``accepted``, up to ``n`` (or a stop token): what the
    reference checks in one pass instead of one pass per token (``StreamingReference.greedy``)."""
    def draft(k: int, accepted: list[int], n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n and not (out and out[-1] in stops):
            tail = [*accepted, *out]
            logits = model.decoder.prefill([*segments[k], tail] if tail else segments[k])
            out.append(int(np.argmax(logits)))
        return out
    return draft


def compare_logits(model: KimiVL, segments: list, cont: list[int], want: np.ndarray, seq: list[int],
                   pad: int) -> dict[str, float]:
    """Teacher-forced over prompt + continuation: the file's logits at every position (``Decoder.prefill``, as
    ``KimiVL.logits`` does for the continuation alone) against the reference's ``want`` ([len(seq) - 1, vocab]),
    on the positions that predict a text token (not a media pad)."""
    got = model.decoder.prefill([*segments, cont[:-1]] if len(cont) > 1 else segments, n_logits=len(seq) - 1)
    return logit_metrics(got, want, np.flatnonzero(np.asarray(seq[1:]) != pad))


def verdicts(result: dict, model_path: str, mmproj_path: str | None) -> list[dict]:
    out = []
    ftype = file_type(model_path)
    m = pooled([{k: r[k] for k in ("positions", "kld_mean", "kld_max", "top1", "top5")} for r in result["prompts"]],
               "positions")
    ok, bounds = text_verdict(m, ftype)
    out.append({"file": model_path, "type": ftype, "pass": ok, "bounds": bounds, **m})
    if mmproj_path is not None and result["images"]:
        ftype = file_type(mmproj_path)
        m = pooled([{k: r[k] for k in ("tokens", "cos_mean", "cos_min", "cos_p1")} for r in result["images"]],
                   "tokens")
        ok, bounds = mmproj_verdict(m, ftype)
        out.append({"file": mmproj_path, "type": ftype, "pass": ok, "bounds": bounds, **m})
    return out


def verdict_line(v: dict) -> str:
    word = "PASS" if v["pass"] else "FAIL"
    if "kld_mean" in v:
        figs = (f"KLD mean {v['kld_mean']:.3g} max {v['kld_max']:.3g}, top-1 {100 * v['top1']:.1f} %, "
                f"top-5 {100 * v['top5']:.1f} % over {v['positions']} positions")
    else:
        figs = (f"cos mean {v['cos_mean']:.6f} min {v['cos_min']:.6f} p1 {v['cos_p1']:.6f} over {v['tokens']} "
                "image tokens")
    return f"{word} {v['file']} ({v['type']}): {figs}; {v['bounds']}"


def write_json_atomic(path: str, obj: dict) -> None:
    """Write to a temporary file next to ``path``, then rename: an interrupted run leaves no partial file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


# -- CLI --------------------------------------------------------------------------------------------------------

def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise KimiVLError(f"verify runs the fp32 reference, which needs torch: {INSTALL}") from None


def terminal_progress(stream=sys.stderr) -> Callable[[str, int, int], None] | None:
    if not stream.isatty():
        return None

    def show(stage: str, done: int, total: int) -> None:
        stream.write(f"\rreference: {stage}, layer {done}/{total}\033[K")
        if done == total:
            stream.write("\r\033[K")
        stream.flush()

    return show


def parse(argv: list[str] | None):
    from .cli import OneLineParser

    ap = OneLineParser(prog="kimivl-edge verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="the Hugging Face checkpoint directory the files were converted from")
    ap.add_argument("-m", "--model", required=True, help="text GGUF")
    ap.add_argument("--mmproj", help="vision GGUF (without it, prompts with images are skipped)")
    ap.add_argument("--image", action="append", default=[], help="image to check (repeat; replaces the defaults)")
    ap.add_argument("--prompts", help="JSONL file of prompts (replaces the defaults)")
    ap.add_argument("--max-new-tokens", type=int, default=8,
                    help="greedy continuation length (default 8; the reference reads all layers once per token)")
    ap.add_argument("--threads", type=int, help="CPU threads for the runtime (default: all cores)")
    ap.add_argument("--json", help="write all figures to this file")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        ap.error(f"--json {args.json}: its directory does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    require_torch()
    from .checkpoint import Checkpoint
    from .model import KimiVL
    from .reference.streaming import StreamingReference

    ref = StreamingReference(Checkpoint(args.checkpoint), progress=terminal_progress())
    with KimiVL.load(args.model, args.mmproj, kv_type="f32", n_threads=args.threads,
                     max_image_patches=MAX_IMAGE_PATCHES) as model:
        cases = choose_cases(args.prompts, args.image, model.info.is_thinking)
        if args.mmproj is None:
            if any(c.images for c in cases):
                print("note: no --mmproj, prompts with images skipped", file=sys.stderr)
            cases = [c for c in cases if not c.images]
        if not cases:
            raise UsageError("nothing to verify: every prompt has images and no --mmproj was given")
        result = run(model, ref, cases, args.max_new_tokens, print)
    result["verdicts"] = verdicts(result, args.model, args.mmproj)
    result["reference_peak_weight_bytes"] = ref.meter.peak
    for v in result["verdicts"]:
        print(verdict_line(v))
    if args.json is not None:
        write_json_atomic(args.json, result)
    return 0 if all(v["pass"] for v in result["verdicts"]) else 1
