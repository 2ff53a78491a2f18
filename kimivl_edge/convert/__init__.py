"""HF Kimi-VL checkpoint -> text GGUF (deepseek2) + mmproj GGUF (clip/kimivl), quantized, streamed, atomic.

    from kimivl_edge.convert import convert_checkpoint
    text_path, mmproj_path = convert_checkpoint("path/or/moonshotai/Kimi-VL-A3B-Instruct", outtype="q4_k_m")

The checkpoint's files are read as data; no code from the checkpoint is imported. Every file is written in one pass
over the checkpoint: row blocks are widened, encoded on every core by ggml's own quantizer (``quant.kernels``; the
K-quant mixes Q4_K_M / Q5_K_M / Q6_K get exactly the per-tensor types and bytes of llama.cpp's
``llama_model_quantize``, without its intermediate file) and written in order.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..config import TEMPERATURE, VARIANTS
from ..errors import CheckpointError, UsageError

from ..quant.types import QType, as_ftype
from .gguf_out import GGUFPlan, write_gguf

TEXT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "q4_k_edge")
MMPROJ_TYPES = ("f32", "f16", "q8_0", "q4_0")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A directory, or an HF repo id (``owner/name``) looked up offline in the local HF cache."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    s = str(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not p.exists():
        hub = os.environ.get("HF_HUB_CACHE") or (
            Path(os.environ["HF_HOME"]) / "hub" if os.environ.get("HF_HOME") else Path.home() / ".cache/huggingface/hub")
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


@dataclass
class ConvertPlan:
    checkpoint: Path
    variant: str
    variant_source: str
    outtype: str
    mmproj_type: str
    text: GGUFPlan
    mmproj: GGUFPlan
    text_path: Path
    mmproj_path: Path

    @property
    def text_final(self) -> dict:
        """gguf name -> (type, reason) of every text tensor (after the write: range fallbacks included)."""
        return {p.name: (p.qtype, p.reason) for p in self.text.tensors}

    def expected_text_bytes(self) -> int:
        from ..quant.types import nbytes

        shapes = {p.name: p.shape for p in self.text.tensors}
        return sum(nbytes(q, shapes[n]) for n, (q, _) in self.text_final.items())


def _check_checkpoint_files(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json (not a Hugging Face checkpoint directory)")
    has_st = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not has_st:
        raise CheckpointError(f"{path}: only pickle weights ({', '.join(sorted(pickles)[:3])}); pickle checkpoints "
                              "are refused (they can run code): provide safetensors")


def plan_conversion(checkpoint: str | os.PathLike, outtype: str = "q8_0", mmproj_type: str = "f16",
                    outdir: str | os.PathLike | None = None, variant: str | None = None) -> ConvertPlan:
    import gguf

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
    t = ck.config.text

    ftype = as_ftype(outtype)
    n_total = sum(
        int(np.prod(ck.shard(s).shape(n))) for n, s in ck.weight_map.items()
        if n.startswith("language_model.") and not n.endswith("inv_freq"))
    n_expert_params = t.n_routed_experts * 3 * t.hidden_size * t.moe_intermediate_size * sum(
        t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    common = {
        "general.name": (name, None),
        "general.basename": ("Kimi-VL", None),
        "general.finetune": (name.removeprefix("Kimi-VL-A3B-"), None),
        "general.organization": ("Moonshotai", None),
        "general.license": ("mit", None),
        "general.quantization_version": (gguf.GGML_QUANT_VERSION, None),
        "general.sampling.temp": (TEMPERATURE[var], None),
        "kimivl_edge.variant": (var, None),
    }
    size_label = gguf.size_label(n_total, n_total - n_expert_params, n_expert_params, t.n_routed_experts)
    if (t.hidden_size, t.num_hidden_layers, t.n_routed_experts) == (2048, 27, 64):
        size_label = "16B-A3B"  # the label the model is known by
    text_kv = {**common, "general.size_label": (size_label, None),
               "general.file_type": (ftype.llama_ftype, None), "kimivl_edge.file_type": (ftype.value, None),
               **text_metadata(ck), **vocab_metadata(path)}
    text = text_plan(ck, outtype, text_kv)
    mmproj = mmproj_plan(ck, mmproj_type, extra_kv=common)
    return ConvertPlan(path, var, how, outtype, mmproj_type, text, mmproj,
                       out / f"{name}-{outtype.upper()}.gguf", out / f"mmproj-{name}-{mmproj_type.upper()}.gguf")


def format_plan(plan: ConvertPlan) -> str:
    """The per-tensor plan (GGUF name, ggml shape, type, why) and the expected file sizes, for --dry-run."""
    lines = [f"checkpoint {plan.checkpoint}", f"variant {plan.variant} ({plan.variant_source})", ""]
    for title, gp, final in (("text", plan.text, plan.text_final),
                             ("mmproj", plan.mmproj, {p.name: (p.qtype, p.reason) for p in plan.mmproj.tensors})):
        lines.append(f"== {title}: {len(gp.tensors)} tensors")
        for p in gp.tensors:
            q, why = final[p.name]
            lines.append(f"{p.name:36s} {str(list(p.ne)):22s} {QType(q).value if isinstance(q, QType) else q!s:7s} "
                         f"{why}")
        lines.append("")
    tb, mb = plan.expected_text_bytes(), plan.mmproj.data_bytes
    lines.append(f"{plan.text_path}  ~{tb / 1e6:.1f} MB ({8 * tb / max(plan.text.n_params, 1):.2f} bits/weight)")
    lines.append(f"{plan.mmproj_path}  ~{mb / 1e6:.1f} MB ({8 * mb / max(plan.mmproj.n_params, 1):.2f} bits/weight)")
    lines.append("(a tensor with values past its type's range is kept BF16/F32 instead; that is found while writing)")
    return "\n".join(lines)


def _check_outdir(plan: ConvertPlan) -> None:
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


@dataclass
class ConvertResult:
    text_path: Path
    mmproj_path: Path
    seconds: float
    peak_rss_bytes: int
    plan: ConvertPlan

    def __iter__(self):  # so `text, mmproj = convert_checkpoint(...)` works
        return iter((self.text_path, self.mmproj_path))


def convert_checkpoint(checkpoint: str | os.PathLike, outtype: str = "q8_0", mmproj_type: str = "f16",
                       outdir: str | os.PathLike | None = None, variant: str | None = None,
                       progress: bool = False, threads: int | None = None) -> ConvertResult:
    """Convert and quantize with ``threads`` encoder threads (default: every core); returns the written paths
    (text GGUF, mmproj GGUF), the wall time and the process's peak RSS."""
    t0 = time.perf_counter()
    plan = plan_conversion(checkpoint, outtype, mmproj_type, outdir, variant)
    _check_outdir(plan)
    bar = None
    if progress:
        from tqdm import tqdm

        total = plan.text.data_bytes + plan.mmproj.data_bytes
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert")
    on_bytes = bar.update if bar is not None else None
    try:
        write_gguf(plan.text_path, plan.text, on_bytes, threads)
        write_gguf(plan.mmproj_path, plan.mmproj, on_bytes, threads)
    finally:
        if bar is not None:
            bar.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return ConvertResult(plan.text_path, plan.mmproj_path, time.perf_counter() - t0, rss, plan)
