"""The child-process harness: each measured step runs in a fresh interpreter (``python -c`` on ``child_main``), so
its wall time and peak RSS are its own (``wait4`` rusage / ``VmHWM``). The parent writes the task as JSON, the child
runs it (``tasks.CHILD_TASKS``) and writes its result as JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import KimiVLError
from .probes import peak_rss
from .tasks import CHILD_TASKS

CHILD_CODE = "import sys; from kimivl_edge.bench import child_main; sys.exit(child_main(sys.argv[1:]))"
LOG_TAIL_CHARS = 300  # of the log's last line, in an error message


@dataclass
class Measured:
    """A finished child process: its exit code, wall seconds and peak RSS in bytes.

    ``run_measured`` takes the peak from ``wait4``'s rusage, which Linux never reports below the parent's RSS at the
    time of the fork (the forked copy's high-water mark survives ``exec``): the bench parent stays small for that
    reason, and ``Children.run`` replaces it with the child's own ``VmHWM``."""

    returncode: int
    seconds: float
    peak_rss_bytes: int


def run_measured(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Measured:
    """Run ``cmd`` with stdout and stderr appended to ``log``; wall time and the child's own peak RSS."""
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return Measured(p.returncode, seconds, usage.ru_maxrss * 1024)


@dataclass
class FirstByte:
    """A finished process whose stdout was read through a pipe: seconds from its start to the first stdout byte
    after its ``skip`` preamble bytes (None if none came), to its exit, its peak RSS and its whole stdout."""

    returncode: int
    first_byte_seconds: float | None
    seconds: float
    peak_rss_bytes: int
    stdout: bytes


def run_first_byte(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None, skip: int = 0) -> FirstByte:
    """Run ``cmd`` (stderr appended to ``log``, stdout read unbuffered through a pipe as it comes) and time the
    first stdout byte after the first ``skip`` bytes. The child's own buffering decides when its bytes arrive: both
    tools the bench times this way flush stdout after every generated piece."""
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        t0 = time.perf_counter()
        p = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=fh, env=env, bufsize=0)
        assert p.stdout is not None
        out, first = bytearray(), None
        try:
            while chunk := os.read(p.stdout.fileno(), 65536):
                out += chunk
                if first is None and len(out) > skip:
                    first = time.perf_counter() - t0
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            p.stdout.close()
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return FirstByte(p.returncode, first, seconds, usage.ru_maxrss * 1024, bytes(out))


def log_tail(log: Path, empty: str = "") -> str:
    """The last line of ``log`` (at most ``LOG_TAIL_CHARS``), or ``empty``."""
    lines = log.read_text(errors="replace").strip().splitlines()
    return (lines[-1] if lines else empty)[:LOG_TAIL_CHARS]


class Children:
    """Runs bench steps in fresh interpreters (BLAS/OpenMP threads set to ``threads``), logging to one file."""

    def __init__(self, workdir: Path, threads: int):
        self.workdir, self.threads, self.n = workdir, threads, 0
        self.log = workdir / "children.log"
        self.env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                        MKL_NUM_THREADS=str(threads))

    def run(self, task: dict) -> tuple[dict, Measured]:
        self.n += 1
        spec, result = self.workdir / f"task-{self.n}.json", self.workdir / f"result-{self.n}.json"
        spec.write_text(json.dumps(task))
        m = run_measured([sys.executable, "-c", CHILD_CODE, str(spec), str(result)], self.log, self.env)
        if m.returncode != 0 or not result.is_file():
            raise KimiVLError(f"bench step {task['kind']} failed (exit code {m.returncode}): "
                              f"{log_tail(self.log, '(no output)')} (log: {self.log})")
        data = json.loads(result.read_text())
        spec.unlink()
        result.unlink()
        m.peak_rss_bytes = data["vmhwm_bytes"]  # the child's own high-water mark (see Measured)
        return data, m


def child_main(argv: Sequence[str]) -> int:
    """Entry point of a child: run the task in argv[0] (JSON), write its result (JSON) to argv[1]."""
    task = json.loads(Path(argv[0]).read_text())
    out = CHILD_TASKS[task["kind"]](task)
    out["vmhwm_bytes"] = peak_rss()
    Path(argv[1]).write_text(json.dumps(out))
    return 0


def pair_or_bundled(model: str | None, mmproj: str | None, root: Path) -> tuple[Path, Path]:
    """The GGUF pair a section module runs on: the given files, or (without ``--model``) the bundled trained tiny
    checkpoint converted to Q4_K_M + Q8_0 mmproj under ``root / "pair"``, as the bench's sections use."""
    if model is not None and mmproj is not None:
        return Path(model), Path(mmproj)
    from ..convert import convert_checkpoint

    res = convert_checkpoint(Path(__file__).parents[1] / "assets" / "kimi-vl-tiny", "q4_k_m", "q8_0", root / "pair")
    return Path(res.text_path), Path(res.mmproj_path)
