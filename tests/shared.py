"""Helpers the tests share: editing a generated checkpoint in place (to break it on purpose), converting it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


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
    import numpy as np

    from kimivl_edge.quant.codec import dequantize
    from kimivl_edge.quant.types import as_qtype

    raw, ttype, shape = mm.tensor(name)
    if ttype == "F32":
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    return dequantize(raw, as_qtype(ttype), shape)
