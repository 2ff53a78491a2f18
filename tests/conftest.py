"""Session fixtures the test modules share: tiny checkpoints, their converted GGUF pairs, and the CLI.

Checkpoints and pairs are made once per session (per xdist worker) and cached by their arguments, so modules
that need the same tiny model do not synthesize or convert it again. They are shared: a test that breaks a
checkpoint on purpose copies it first (``copy_checkpoint``).
"""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import run_cli

CKPT_NAMES = {"instruct": "Kimi-VL-A3B-Instruct", "thinking": "Kimi-VL-A3B-Thinking",
              "thinking-2506": "Kimi-VL-A3B-Thinking-2506"}


def pytest_collection_modifyitems(config, items) -> None:
    """Without chromium every page test would fail the same way: tests/test_web.py's test_chromium_is_installed
    then runs alone and fails once, naming the install command; the other page tests are deselected."""
    gate = next((i for i in items if i.name == "test_chromium_is_installed"), None)
    if gate is None or gate.module.chromium_found():
        return
    dropped = [i for i in items if getattr(i, "module", None) is gate.module and i is not gate]
    config.hook.pytest_deselected(items=dropped)
    items[:] = [i for i in items if i not in dropped]


@pytest.fixture(scope="session", autouse=True)
def sigint_delivered() -> None:
    """The Ctrl-C tests send SIGINT to child processes. A suite started in the background of a non-interactive shell
    (`.ci/run &`) inherits SIGINT ignored, and so would every child (an ignored signal stays ignored across exec):
    this process takes Python's own handler back, so its children start with SIGINT at its default."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory) -> Path:
    """The CLI verbs keep a prefix cache under $XDG_CACHE_HOME by default: tests (and the CLI subprocesses they
    start) use a private one, never the user's. llama.cpp's own tools (``bench.llama_tools``, 15 minutes to build)
    stay where the user's cache has them, built once, not once per test run."""
    from kimivl_edge.bench import llama_tools

    os.environ.setdefault("KIMIVL_EDGE_LLAMA_TOOLS", str(llama_tools.root_dir()))
    home = tmp_path_factory.mktemp("xdg-cache")
    os.environ["XDG_CACHE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_checkpoint(variant="instruct", seed=0)``: a synthetic tiny checkpoint in the real HF layout, named
    like the real download (the variant is detected from the name). Shared: do not modify it."""
    from kimivl_edge.synth import synth

    root = tmp_path_factory.mktemp("ckpts")
    made: dict[tuple[str, int], Path] = {}

    def get(variant: str = "instruct", seed: int = 0) -> Path:
        key = (variant, seed)
        if key not in made:
            (root / f"seed{seed}").mkdir(exist_ok=True)
            made[key] = Path(synth(root / f"seed{seed}" / CKPT_NAMES[variant], "tiny", variant, seed=seed))
        return made[key]

    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """``converted(ckpt, text_type, mmproj_type)``: the checkpoint's (text GGUF, mmproj GGUF), made once."""
    from kimivl_edge.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str, str], tuple[Path, Path]] = {}

    def get(ckpt: Path, text_type: str = "f32", mmproj_type: str = "f32") -> tuple[Path, Path]:
        key = (str(ckpt), text_type, mmproj_type)
        if key not in made:
            out = root / f"{len(made)}-{text_type}-{mmproj_type}"
            text, mmproj = convert_checkpoint(ckpt, text_type, mmproj_type, out)
            made[key] = (Path(text), Path(mmproj))
        return made[key]

    return get


@pytest.fixture(scope="session")
def pics(tmp_path_factory) -> Path:
    """A directory of the demo's pictures (kimivl_edge.demo.demo_images), made once; tests only read it."""
    from kimivl_edge.demo import demo_images

    root = tmp_path_factory.mktemp("pics")
    demo_images(root)
    return root


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a shared checkpoint, for tests that edit or break it."""
    shutil.copytree(src, dst)
    return dst
