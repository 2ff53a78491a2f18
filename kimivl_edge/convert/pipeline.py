"""The conversion pipeline: checkpoint -> plan (``plan_conversion``, printed by ``--dry-run``) -> two written files
(``convert_checkpoint``, which returns what was written).

Data flows one way: the plan (frozen ``ConvertPlan``: paths, metadata, every tensor's planned type and why) is
built from the checkpoint's config and headers alone, no tensor read; ``gguf_out.write_partial`` writes each file
from it under a partial name (both renamed together at the end) and returns a ``WriteReport`` (the written types,
range fallbacks and NaN / Inf counts included), collected in ``ConvertResult``.
"""
from __future__ import annotations

import math
import os
import re
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import Keys

from ..checkpoint import Checkpoint
from ..config import TEMPERATURE
from ..errors import CheckpointError, UsageError
from ..gguf_keys import EdgeKeys
from ..quant.imatrix_file import Imatrix, check_for_model, read_imatrix
from ..quant.policy import MMPROJ_TYPES, requires_imatrix
from ..quant.types import FType, as_ftype
from .gguf_out import GGUFPlan, WriteReport, partial_files, write_partial
from .outdir import (DISK_ERRNOS, check_space, check_writable, default_outdir, disk_error, format_size,
                     hf_hub_cache, remove_stale_partials)
from .variant import detect_variant, model_name

__all__ = ["TEXT_TYPES", "MMPROJ_TYPES", "TEMPERATURE", "resolve_checkpoint", "ConvertPlan", "plan_conversion",
           "format_plan", "check_outdir", "ConvertResult", "convert_checkpoint", "format_result"]

TEXT_TYPES = tuple(f.value.lower() for f in FType)
# the keys llama-quantize adds to a file quantized with an importance matrix (tools/quantize/quantize.cpp)
IMATRIX_FILE, IMATRIX_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
IMATRIX_ENTRIES, IMATRIX_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
RANGE_NOTE = ("a tensor with values past its type's range is written BF16 (text) / F32 (mmproj) instead; "
              "that is found while writing")


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A directory, or an HF repo id (``owner/name``) looked up offline in the local HF cache."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    s = str(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not p.exists():
        hub = hf_hub_cache()
        repo = hub / ("models--" + s.replace("/", "--"))
        snaps = repo / "snapshots"
        if snaps.is_dir():
            ref = repo / "refs" / "main"
            if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
                return snaps / ref.read_text().strip()
            candidates = sorted((d for d in snaps.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
            if candidates:
                return candidates[-1]
        raise UsageError(f"{s}: not a directory and not in the local Hugging Face cache ({hub}); "
                         "download it first (no network access is used)")
    raise UsageError(f"{spec}: no such checkpoint directory")


@dataclass(frozen=True)
class ConvertPlan:
    """What ``convert_checkpoint`` will write: both files' plans and paths."""

    checkpoint: Path
    variant: str
    variant_source: str
    outtype: str
    mmproj_type: str
    text: GGUFPlan
    mmproj: GGUFPlan
    text_path: Path
    mmproj_path: Path

    def expected_text_bytes(self) -> int:
        """Tensor bytes of the text file as planned (a range fallback, found while writing, adds to it)."""
        return sum(t.nbytes for t in self.text.tensors)


def _check_checkpoint_files(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json (not a Hugging Face checkpoint directory)")
    has_st = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not has_st:
        raise CheckpointError(f"{path}: only pickle weights ({', '.join(sorted(pickles)[:3])}); pickle checkpoints "
                              "are refused (they can run code): provide safetensors")


def _size_label(ck: Checkpoint) -> str:
    """``general.size_label`` from the text parameter counts (the real model: "16B-A3B", the label it is known by)."""
    t = ck.config.text
    if (t.hidden_size, t.num_hidden_layers, t.n_routed_experts) == (2048, 27, 64):
        return "16B-A3B"
    n_total = sum(math.prod(ck.shard(s).shape(n)) for n, s in ck.weight_map.items()
                  if n.startswith("language_model.") and not n.endswith("inv_freq"))
    n_expert = t.n_routed_experts * 3 * t.hidden_size * t.moe_intermediate_size * sum(
        t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    return gguf.size_label(n_total, n_total - n_expert, n_expert, t.n_routed_experts)


def _common_metadata(variant: str, variant_source: str) -> dict[str, tuple[object, object]]:
    """The ``general.*`` keys both files carry, the variant and what decided it."""
    name = model_name(variant)
    G = Keys.General
    return {
        G.NAME: (name, None),
        G.BASENAME: ("Kimi-VL", None),
        G.FINETUNE: (name.removeprefix("Kimi-VL-A3B-"), None),
        G.ORGANIZATION: ("Moonshotai", None),
        G.LICENSE: ("mit", None),
        G.QUANTIZATION_VERSION: (gguf.GGML_QUANT_VERSION, None),
        G.SAMPLING_TEMP: (TEMPERATURE[variant], None),
        EdgeKeys.VARIANT: (variant, None),
        EdgeKeys.VARIANT_SOURCE: (variant_source, None),
    }


def _imatrix(path: str | os.PathLike, ck: Checkpoint, ftype: FType) -> tuple[Imatrix, dict[str, tuple[object, object]]]:
    """The importance matrix at ``path``, checked against the model, and the ``quantize.imatrix.*`` keys
    llama-quantize writes with it (strings cut to 127 bytes as it does)."""
    from .text import text_tensors

    if not ftype.is_kquant_mix:
        raise UsageError(f"--imatrix is for the K-quant and IQ mixes (q4_k_m, q5_k_m, q6_k, q4_k_edge, iq4_xs, ...), "
                         f"not {ftype.value.lower()}")
    im = read_imatrix(path)
    check_for_model(im, path, {x.name: x.shape for x in text_tensors(ck.config.text)})
    kv: dict[str, tuple[object, object]] = {IMATRIX_FILE: (str(path)[:127], None),
                                            IMATRIX_ENTRIES: (len(im.entries), None)}
    if im.datasets:
        kv[IMATRIX_DATASET] = (im.datasets[0][:127], None)
    if im.chunk_count > 0:
        kv[IMATRIX_CHUNKS] = (im.chunk_count, None)
    return im, kv


def _check_imatrix_needed(plan: GGUFPlan, outtype: str, imatrix: str | os.PathLike | None) -> None:
    """Tensors llama.cpp refuses to quantize without importance weights must have them (one line)."""
    need = [t for t in plan.tensors if requires_imatrix(t.name, t.qtype) and not t.weighted]
    if not need:
        return
    t = need[0]
    if imatrix is None:
        raise UsageError(f"--outtype {outtype} requires an importance matrix ({t.name} would be {t.qtype.value}): "
                         "make one with `kimivl-edge imatrix` and pass --imatrix FILE")
    raise UsageError(f"--imatrix {imatrix} has no entry for {t.name}, which {t.qtype.value} requires")


def plan_conversion(checkpoint: str | os.PathLike, outtype: str = "q8_0", mmproj_type: str = "f16",
                    outdir: str | os.PathLike | None = None, variant: str | None = None,
                    imatrix: str | os.PathLike | None = None) -> ConvertPlan:
    """Both files' plans from the checkpoint's config, headers and tokenizer files (no tensor is read). The files
    go to ``outdir``, by default the current directory (``outdir.default_outdir``). ``imatrix``: an importance
    matrix file (llama.cpp's GGUF format, ``kimivl-edge imatrix``) for a K-quant or IQ mix."""
    from .mmproj import mmproj_plan
    from .text import text_metadata, text_plan
    from .tokenizer import vocab_metadata

    outtype, mmproj_type = outtype.lower(), mmproj_type.lower()
    if outtype not in TEXT_TYPES:
        raise UsageError(f"unknown --outtype {outtype!r} (choose from {', '.join(TEXT_TYPES)})")
    if mmproj_type not in MMPROJ_TYPES:
        raise UsageError(f"unknown --mmproj-type {mmproj_type!r} (choose from {', '.join(MMPROJ_TYPES)})")
    path = resolve_checkpoint(checkpoint)
    _check_checkpoint_files(path)
    ck = Checkpoint(path)
    var, how = detect_variant(path, variant)
    name = model_name(var)
    out = Path(outdir) if outdir is not None else default_outdir()
    ftype = as_ftype(outtype)
    common = _common_metadata(var, how)
    im, im_kv = _imatrix(imatrix, ck, ftype) if imatrix is not None else (None, {})
    text_kv = {**common, Keys.General.SIZE_LABEL: (_size_label(ck), None),
               Keys.General.FILE_TYPE: (ftype.llama_ftype, None), EdgeKeys.FILE_TYPE: (ftype.value, None),
               **text_metadata(ck), **vocab_metadata(path), **im_kv}
    text = text_plan(ck, outtype, text_kv, im)
    _check_imatrix_needed(text, outtype, imatrix)
    return ConvertPlan(path, var, how, outtype, mmproj_type, text,
                       mmproj_plan(ck, mmproj_type, extra_kv=common),
                       out / f"{name}-{outtype.upper()}.gguf", out / f"mmproj-{name}-{mmproj_type.upper()}.gguf")


def _bits_per_weight(n_bytes: int, n_params: int) -> float:
    return 8 * n_bytes / max(n_params, 1)


def format_plan(plan: ConvertPlan) -> str:
    """The per-tensor plan (GGUF name, ggml shape, type, why) and the expected file sizes, for --dry-run."""
    lines = [f"checkpoint {plan.checkpoint}", f"variant {plan.variant} ({plan.variant_source})", ""]
    for title, gp in (("text", plan.text), ("mmproj", plan.mmproj)):
        lines.append(f"== {title}: {len(gp.tensors)} tensors")
        lines += [f"{p.name:36s} {str(list(p.ne)):22s} {p.qtype.value:7s} {p.reason}" for p in gp.tensors]
        lines.append("")
    for path, gp in ((plan.text_path, plan.text), (plan.mmproj_path, plan.mmproj)):
        lines.append(f"{path}  ~{format_size(gp.file_bytes)} "
                     f"({_bits_per_weight(gp.file_bytes, gp.n_params):.2f} bits/weight)")
    lines.append(f"({RANGE_NOTE})")
    return "\n".join(lines)


def check_outdir(plan: ConvertPlan) -> list[Path]:
    """The output directory exists (created if need be), takes files (not a file, not read-only, not the HF cache
    or the package) and, once the stale partial files of killed conversions are removed (returned), has room for
    both files, headers included."""
    out = plan.text_path.parent
    check_writable(out)
    removed = remove_stale_partials(out)
    check_space(out, plan.text.file_bytes + plan.mmproj.file_bytes)
    return removed


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert_checkpoint`` wrote (one ``WriteReport`` per file), from which plan, in what time and memory,
    and the stale partial files of killed conversions it removed."""

    plan: ConvertPlan
    text: WriteReport
    mmproj: WriteReport
    seconds: float
    peak_rss_bytes: int
    removed_partials: tuple[Path, ...] = ()

    @property
    def text_path(self) -> Path:
        return self.text.path

    @property
    def mmproj_path(self) -> Path:
        return self.mmproj.path

    def __iter__(self) -> Iterator[Path]:  # so `text, mmproj = convert_checkpoint(...)` works
        return iter((self.text_path, self.mmproj_path))


def _nonfinite_error(reports: tuple[WriteReport, ...]) -> CheckpointError | None:
    """The one-line refusal of a checkpoint with NaN / Inf weights (per tensor), or None."""
    bad = [t for r in reports for t in r.nonfinite]
    if not bad:
        return None
    listed = ", ".join(f"{t.name}: {t.nan} NaN, {t.inf} Inf" for t in bad[:6])
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    return CheckpointError(f"non-finite weights in {len(bad)} tensor(s) ({listed}{more}); nothing was written "
                           "(pass --allow-nonfinite to convert them anyway)")


def convert_checkpoint(checkpoint: str | os.PathLike, outtype: str = "q8_0", mmproj_type: str = "f16",
                       outdir: str | os.PathLike | None = None, variant: str | None = None,
                       progress: bool = False, threads: int | None = None,
                       allow_nonfinite: bool = False, imatrix: str | os.PathLike | None = None) -> ConvertResult:
    """Convert and quantize with ``threads`` encoder threads (default: every core); returns what was written (the
    text GGUF's and mmproj GGUF's ``WriteReport``), the wall time and the process's peak RSS.

    The pair is all-or-nothing: both files are written under partial names and renamed at the end, so a failure or
    interrupt (even in the mmproj phase) leaves neither at its final name. A weight that is NaN or Inf refuses the
    conversion (listed per tensor) unless ``allow_nonfinite``. A full disk (ENOSPC, EDQUOT) or read-only file system
    (EROFS) is a one-line ``KimiVLError``."""
    t0 = time.perf_counter()
    plan = plan_conversion(checkpoint, outtype, mmproj_type, outdir, variant, imatrix)
    removed = tuple(check_outdir(plan))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.text.data_bytes + plan.mmproj.data_bytes, unit="B", unit_scale=True, desc="convert")
    on_bytes: Callable[[int], None] | None = bar.update if bar is not None else None
    try:
        with partial_files([plan.text_path, plan.mmproj_path]) as (text_tmp, mmproj_tmp):
            text = write_partial(text_tmp, plan.text_path, plan.text, on_bytes, threads)
            mmproj = write_partial(mmproj_tmp, plan.mmproj_path, plan.mmproj, on_bytes, threads)
            refusal = None if allow_nonfinite else _nonfinite_error((text, mmproj))
            if refusal is not None:
                raise refusal
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_error(e, plan.text_path.parent) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ConvertResult(plan, text, mmproj, time.perf_counter() - t0, rss, removed)


def format_result(r: ConvertResult) -> str:
    """The stale partials removed, the variant and what decided it, each written file (size, bits per weight), every
    range fallback and kept non-finite tensor, the time and peak RSS."""
    lines = []
    if r.removed_partials:
        lines.append(f"removed {len(r.removed_partials)} stale partial file(s) of killed conversions: "
                     + ", ".join(p.name for p in r.removed_partials))
    lines.append(f"variant {r.plan.variant} ({r.plan.variant_source})")
    for rep in (r.text, r.mmproj):
        lines.append(f"wrote {rep.path}  {format_size(rep.file_bytes)}, "
                     f"{_bits_per_weight(rep.file_bytes, rep.n_params):.2f} bits/weight")
        lines += [f"  {t.name}: written {t.qtype.value} ({t.range_fallback})" for t in rep.range_fallbacks]
        lines += [f"  {t.name}: {t.nan} NaN, {t.inf} Inf kept (--allow-nonfinite)" for t in rep.nonfinite]
    lines.append(f"time {r.seconds:.1f} s, peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
    return "\n".join(lines)
