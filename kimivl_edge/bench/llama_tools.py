"""llama.cpp's own command-line tools, built from the llama.cpp sources that the installed llama-cpp-python vendors.

The benchmark compares us with ``llama-mtmd-cli`` (cold start, vision encode), and the tests compare our imatrix
quantization with ``llama-quantize --imatrix``. Those tools are not in llama-cpp-python's wheel, so they are built
here, once, from the sdist of the *same* llama-cpp-python version (so they run the same ggml as our runtime):

    python -m kimivl_edge.bench.llama_tools            # builds if needed, prints the bin directory

They go to ``$KIMIVL_EDGE_LLAMA_TOOLS`` or ``$XDG_CACHE_HOME/kimivl-edge/llama-tools/<version>/`` (default
``~/.cache``), never into the package. The build needs ``cmake`` and a C++ compiler, fetches the sdist from PyPI
with pip, and takes about 15 minutes on 2 cores; a file lock makes concurrent callers (pytest-xdist workers) wait
for one build. The tools are linked statically, so the bin directory holds everything they need.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

TOOLS = ("llama-mtmd-cli", "llama-quantize", "llama-imatrix")
DIST = "llama-cpp-python"


class ToolsError(RuntimeError):
    """The tools could not be built (no cmake/compiler, no sdist); the message says what is missing."""


def root_dir() -> Path:
    """Where this llama-cpp-python version's tools live."""
    env = os.environ.get("KIMIVL_EDGE_LLAMA_TOOLS")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kimivl-edge" / "llama-tools" / version(DIST)


def bin_dir(root: Path | None = None) -> Path:
    return (root or root_dir()) / "build" / "bin"


def tool(name: str, root: Path | None = None) -> Path:
    """Path of one built tool (``build`` first)."""
    return bin_dir(root) / name


def built(root: Path | None = None, tools: Sequence[str] = TOOLS) -> bool:
    return all(os.access(tool(t, root), os.X_OK) for t in tools)


def _run(cmd: Sequence[str | Path], log: Path, cwd: Path | None = None) -> None:
    with log.open("ab") as f:
        f.write(("\n$ " + " ".join(map(str, cmd)) + "\n").encode())
        f.flush()
        rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if rc != 0:
        raise ToolsError(f"{Path(cmd[0]).name} failed (exit {rc}); see {log}")


def _sources(root: Path, log: Path) -> Path:
    """llama.cpp's source tree from the installed llama-cpp-python version's sdist (downloaded once by pip)."""
    src = root / "src"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src / "vendor" / "llama.cpp"
    dl = root / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    want = f"{DIST}=={version(DIST)}"
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", dl, want],
         log)
    [tgz] = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    tmp = root / "src.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
    [top] = list(tmp.iterdir())
    shutil.rmtree(src, ignore_errors=True)
    top.rename(src)
    shutil.rmtree(tmp)
    return src / "vendor" / "llama.cpp"


def build(root: Path | None = None, tools: Sequence[str] = TOOLS, jobs: int | None = None) -> Path:
    """Build ``tools`` unless they are there; the bin directory. Raises ToolsError with a one-line reason."""
    root = root or root_dir()
    if built(root, tools):
        return bin_dir(root)
    for need in ("cmake", "c++"):
        if shutil.which(need) is None:
            raise ToolsError(f"building llama.cpp's tools needs {need} (Debian: apt-get install cmake g++)")
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits here, then finds the tools built
        if built(root, tools):
            return bin_dir(root)
        log = root / "build.log"
        print(f"building llama.cpp's {', '.join(tools)} in {root} (about 15 min on 2 cores; log: {log})",
              file=sys.stderr, flush=True)
        src = _sources(root, log)
        b = root / "build"
        _run(["cmake", "-S", src, "-B", b, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF"], log)
        _run(["cmake", "--build", b, "-j", str(jobs or os.cpu_count() or 2), "--target", *tools], log)
    if not built(root, tools):
        raise ToolsError(f"llama.cpp's build finished without {', '.join(tools)}; see {root / 'build.log'}")
    return bin_dir(root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimivl_edge.bench.llama_tools", description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, help="build root (default: the user's cache directory)")
    a = ap.parse_args(argv)
    try:
        print(build(a.dir))
    except ToolsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
