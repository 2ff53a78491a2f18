"""Helpers the tests share for editing a generated checkpoint in place (to break it on purpose)."""
from __future__ import annotations

import json
from pathlib import Path


def shards(d: Path) -> list[Path]:
    """The checkpoint's safetensors shards, in order."""
    return sorted(d.glob("model-*-of-*.safetensors"))


def edit_json(path: Path, fn) -> None:
    """Load a JSON file, let ``fn`` change the object in place, write it back."""
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))
