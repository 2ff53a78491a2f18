"""Helpers the tests share: editing a generated checkpoint in place (to break it on purpose), converting it."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np


def shards(d: Path) -> list[Path]:
    """The checkpoint's safetensors shards, in order."""
    return sorted(d.glob("model-*-of-*.safetensors"))


def edit_json(path: Path, fn) -> None:
    """Load a JSON file, let ``fn`` change the object in place, write it back."""
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def mmproj_files(ckpt: Path, types, out: Path) -> dict[str, Path]:
    """The checkpoint converted once per mmproj type (F32 text): {type: mmproj path, "text": the text GGUF}."""
    from kimivl_edge.convert import convert_checkpoint

    files: dict[str, Path] = {}
    for t in types:
        text, mmproj = convert_checkpoint(ckpt, "f32", t, out)
        files[t] = Path(mmproj)
    files["text"] = Path(text)
    return files


def run_cli(*args: str, stdin: str | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m kimivl_edge ARGS`` as a user runs it: text output captured, never raises on a non-zero exit."""
    return subprocess.run([sys.executable, "-m", "kimivl_edge", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, **kw)


def mmproj_float32(mm, name: str):
    """An mmproj tensor decoded to float32 in its numpy shape (a test oracle: the runtime decodes per layer)."""
    from kimivl_edge.quant.codec import dequantize
    from kimivl_edge.quant.types import as_qtype

    raw, ttype, shape = mm.tensor(name)
    if ttype == "F32":
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    return dequantize(raw, as_qtype(ttype), shape)


def llama_last_logits(decoder) -> np.ndarray:
    """A copy of the logits llama.cpp holds for the last evaluated position of a ``Decoder`` or a ``BatchDecoder``
    (anything with the llama.cpp context ``ctx`` and ``n_vocab``): [n_vocab]."""
    import llama_cpp

    p = llama_cpp.llama_get_logits_ith(decoder.ctx, -1)
    return np.ctypeslib.as_array(p, shape=(decoder.n_vocab,)).copy()


def blocked_attention(enc, q: np.ndarray, k: np.ndarray, v: np.ndarray, grids) -> np.ndarray:
    """The numpy encoder's block-diagonal attention (docs/model.md §5.3) on its own, with its query blocks
    (``enc.max_score_bytes``) and workers (``enc.threads``): q, k, v [n, heads, d] (RoPE applied) -> [n, heads*d]."""
    from kimivl_edge.threads import single_threaded_blas, worker_pool
    from kimivl_edge.vision import ScoreScratch, attend, attention_items

    n, heads, d = q.shape
    qkvh = np.ascontiguousarray(np.stack([q, k, v]).transpose(0, 2, 1, 3), dtype=np.float32)
    qkvh[0] *= np.float32(1.0 / math.sqrt(d))
    out = np.empty((n, heads, d), np.float32)
    scratch = ScoreScratch()
    items = attention_items(grids, heads, enc.max_score_bytes)
    with single_threaded_blas(), worker_pool(enc.threads) as pool:
        list(pool.map(lambda it: attend(it, qkvh[0], qkvh[1], qkvh[2], out, scratch), items))
    return out.reshape(n, heads * d)
