"""The conversion pipeline: checkpoint -> plan (``plan_conversion``, printed by ``--dry-run``) -> two written files
(``convert_checkpoint``, which returns what was written).

Data flows one way: the plan (frozen ``ConvertPlan``: paths, metadata, every tensor's planned type and why) is
built from the checkpoint's config and headers alone, no tensor read; ``gguf_out.write_gguf`` writes each file from
it and returns a ``WriteReport`` (the written types, range fallbacks included), collected in ``ConvertResult``.
"""
from __future__ import annotations

import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import Keys

from ..checkpoint import Checkpoint
from ..config import TEMPERATURE, VARIANTS
from ..errors import CheckpointError, UsageError
from ..gguf_keys import EdgeKeys
from ..quant.policy import MMPROJ_TYPES
from ..quant.types import FType, as_ftype
from .gguf_out import GGUFPlan, WriteReport, write_gguf

__all__ = ["TEXT_TYPES", "MMPROJ_TYPES", "TEMPERATURE", "resolve_checkpoint", "detect_variant", "model_name",
           "ConvertPlan", "plan_conversion", "format_plan", "check_outdir", "ConvertResult", "convert_checkpoint",
           "format_result"]

TEXT_TYPES = tuple(f.value.lower() for f in FType)
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
        home = os.environ.get("HF_HOME")
        hub = os.environ.get("HF_HUB_CACHE") or (Path(home) / "hub" if home else Path.home() / ".cache/huggingface/hub")
        repo = Path(hub) / ("models--" + s.replace("/", "--"))
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


def detect_variant(path: Path, given: str | None) -> tuple[str, str]:
    """The variant and how it was decided: --variant, else the directory / HF repo name, else instruct."""
    if given:
        if given not in VARIANTS:
            raise UsageError(f"unknown variant {given!r} (choose from {', '.join(VARIANTS)})")
        return given, "--variant"
    text = str(path.resolve()).lower()
    if "thinking-2506" in text or "thinking_2506" in text:
        return "thinking-2506", "from the path"
    if "thinking" in text:
        return "thinking", "from the path"
    if "instruct" in text:
        return "instruct", "from the path"
    return "instruct", "assumed (pass --variant)"


def model_name(variant: str) -> str:
    return "Kimi-VL-A3B-" + {"instruct": "Instruct", "thinking": "Thinking", "thinking-2506": "Thinking-2506"}[variant]


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


def _common_metadata(variant: str) -> dict[str, tuple[object, object]]:
    """The ``general.*`` keys both files carry, and the variant."""
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
    }


def plan_conversion(checkpoint: str | os.PathLike, outtype: str = "q8_0", mmproj_type: str = "f16",
                    outdir: str | os.PathLike | None = None, variant: str | None = None) -> ConvertPlan:
    """Both files' plans from the checkpoint's config, headers and tokenizer files (no tensor is read)."""
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
    out = Path(outdir) if outdir is not None else path
    ftype = as_ftype(outtype)
    common = _common_metadata(var)
    text_kv = {**common, Keys.General.SIZE_LABEL: (_size_label(ck), None),
               Keys.General.FILE_TYPE: (ftype.llama_ftype, None), EdgeKeys.FILE_TYPE: (ftype.value, None),
               **text_metadata(ck), **vocab_metadata(path)}
    return ConvertPlan(path, var, how, outtype, mmproj_type, text_plan(ck, outtype, text_kv),
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
    tb, mb = plan.expected_text_bytes(), plan.mmproj.data_bytes
    lines.append(f"{plan.text_path}  ~{tb / 1e6:.1f} MB ({_bits_per_weight(tb, plan.text.n_params):.2f} bits/weight)")
    lines.append(f"{plan.mmproj_path}  ~{mb / 1e6:.1f} MB "
                 f"({_bits_per_weight(mb, plan.mmproj.n_params):.2f} bits/weight)")
    lines.append(f"({RANGE_NOTE})")
    return "\n".join(lines)


def check_outdir(plan: ConvertPlan) -> None:
    """The output directory exists (created if need be), is writable and has room for both files."""
    out = plan.text_path.parent
    if not out.exists():
        try:
            out.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"cannot create output directory {out}: {e.strerror}") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {out} is not writable")
    need = plan.expected_text_bytes() + plan.mmproj.data_bytes
    free = shutil.disk_usage(out).free
    if need > free:
        raise UsageError(f"not enough free disk in {out}: the conversion needs {need / 1e9:.2f} GB, "
                         f"{free / 1e9:.2f} GB free")


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert_checkpoint`` wrote (one ``WriteReport`` per file), from which plan, in what time and memory."""

    plan: ConvertPlan
    text: WriteReport
    mmproj: WriteReport
    seconds: float
    peak_rss_bytes: int

    @property
    def text_path(self) -> Path:
        return self.text.path

    @property
    def mmproj_path(self) -> Path:
        return self.mmproj.path

    def __iter__(self) -> Iterator[Path]:  # so `text, mmproj = convert_checkpoint(...)` works
        return iter((self.text_path, self.mmproj_path))


def convert_checkpoint(checkpoint: str | os.PathLike, outtype: str = "q8_0", mmproj_type: str = "f16",
                       outdir: str | os.PathLike | None = None, variant: str | None = None,
                       progress: bool = False, threads: int | None = None) -> ConvertResult:
    """Convert and quantize with ``threads`` encoder threads (default: every core); returns what was written (the
    text GGUF's and mmproj GGUF's ``WriteReport``), the wall time and the process's peak RSS."""
    t0 = time.perf_counter()
    plan = plan_conversion(checkpoint, outtype, mmproj_type, outdir, variant)
    check_outdir(plan)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.text.data_bytes + plan.mmproj.data_bytes, unit="B", unit_scale=True, desc="convert")
    on_bytes: Callable[[int], None] | None = bar.update if bar is not None else None
    try:
        text = write_gguf(plan.text_path, plan.text, on_bytes, threads)
        mmproj = write_gguf(plan.mmproj_path, plan.mmproj, on_bytes, threads)
    finally:
        if bar is not None:
            bar.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ConvertResult(plan, text, mmproj, time.perf_counter() - t0, rss)


def format_result(r: ConvertResult) -> str:
    """Each written file (size, bits per weight), every range fallback, the time and peak RSS."""
    lines = []
    for rep in (r.text, r.mmproj):
        lines.append(f"wrote {rep.path}  {rep.file_bytes / 1e6:.1f} MB, "
                     f"{_bits_per_weight(rep.file_bytes, rep.n_params):.2f} bits/weight")
        lines += [f"  {t.name}: written {t.qtype.value} ({t.range_fallback})" for t in rep.range_fallbacks]
    lines.append(f"time {r.seconds:.1f} s, peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
    return "\n".join(lines)
