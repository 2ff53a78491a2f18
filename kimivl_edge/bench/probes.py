"""The machine and its limits: CPU and versions, this process's RSS, memory read bandwidth, float32 GEMM peak and
one plain read of a set of files (the yardstick of the conversion's input speed)."""
from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BANDWIDTH_BYTES = 512 << 20
GEMM_N = 2048
CPU_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni"})  # the ones reported

BANDWIDTH_METHOD = ("np.bitwise_or.reduce over a {size} uint64 array (written once, so every page is resident; "
                    "far larger than the caches), whole by one thread and in equal slices by {threads} thread(s) "
                    "(numpy releases the GIL); per run the better of the two, each the best of 3 passes; "
                    "bytes read / seconds")
GEMM_METHOD = "numpy float32 matmul of two {n}x{n} matrices (BLAS, {threads} thread(s)), 2n^3 FLOP, best of 3"


# ---------------------------------------------------------------------------------------------------------------
# process memory

def _proc_status_bytes(key: str) -> int:
    """A ``kB`` line of /proc/self/status (VmHWM = peak RSS, VmRSS = current RSS) in bytes; ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    return _proc_status_bytes("VmHWM")


def current_rss() -> int:
    """This process's resident set size in bytes now (VmRSS)."""
    return _proc_status_bytes("VmRSS")


# ---------------------------------------------------------------------------------------------------------------
# the machine

def _first_values(path: str) -> dict[str, str]:
    """``key: value`` lines of a /proc file, the first value of each key ({} where there is no such file)."""
    info: dict[str, str] = {}
    try:
        for line in Path(path).read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def _ram_bytes() -> int:
    total = _first_values("/proc/meminfo").get("MemTotal")
    return int(total.split()[0]) * 1024 if total else 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    """CPU model, family/model numbers and relevant flags from /proc/cpuinfo, logical CPUs, RAM, versions."""
    info = _first_values("/proc/cpuinfo")
    return {
        "cpu_model": info.get("model name", platform.processor() or "unknown"),
        "cpu_family": info.get("cpu family"),
        "cpu_model_number": info.get("model"),
        "cpu_flags": sorted(set(info.get("flags", "").split()) & CPU_FLAGS),
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "llama_cpp_python": _version("llama_cpp_python"),
        "load_average": load_average(),
    }


# ---------------------------------------------------------------------------------------------------------------
# its limits

def read_bandwidth(nbytes: int = BANDWIDTH_BYTES, threads: int = 1, passes: int = 3) -> float:
    """Memory read bandwidth in bytes/s: a streaming reduction (bitwise OR, a trivial op per 8 bytes) over a large
    resident array, in ``threads`` equal slices, best of ``passes``."""
    a = np.ones(max(nbytes // 8, threads), dtype=np.uint64)
    parts = np.array_split(a, threads)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        best = math.inf
        for _ in range(passes):
            t0 = time.perf_counter()
            if pool is None:
                np.bitwise_or.reduce(a)
            else:
                list(pool.map(np.bitwise_or.reduce, parts))
            best = min(best, time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.shutdown()
    return a.nbytes / best


def gemm_peak(n: int = GEMM_N, passes: int = 3) -> float:
    """float32 GEMM throughput in FLOP/s (2n^3 per n x n product) after one warm-up product, best of ``passes``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = math.inf
    for _ in range(passes):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def raw_read_seconds(files: Sequence[Path], chunk: int = 16 << 20) -> float:
    """Seconds to read ``files`` once, front to back, into a reused buffer (no page cache is dropped)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0
