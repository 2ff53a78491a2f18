"""Thread control for the numpy vision encoder: a worker pool, and BLAS held to one thread while it runs.

numpy's BLAS (OpenBLAS in numpy's wheels) starts its own threads per matmul. The vision encoder already splits its
work over a pool of workers, so BLAS nested inside them would oversubscribe the cores: while any encode runs, BLAS
is set to one thread (process-wide, as OpenBLAS's pthreads server is) and the previous count is restored after.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

__all__ = ["BLAS_SETTERS", "openblas_libraries", "blas_thread_setter", "single_threaded_blas", "worker_pool"]

# OpenBLAS >= 0.3.27's "set the thread count, return the previous one", under the names of its builds
BLAS_SETTERS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_",
                "scipy_openblas_set_num_threads_local")


def openblas_libraries() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (numpy's BLAS), from /proc/self/maps (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            fields = [line.split() for line in f]
    except OSError:
        return []
    return sorted({p[-1] for p in fields if len(p) >= 6 and "openblas" in os.path.basename(p[-1]).lower()})


@lru_cache(maxsize=1)
def blas_thread_setter() -> Callable[[int], int] | None:
    """``openblas_set_num_threads_local`` (OpenBLAS >= 0.3.27: sets the thread count, returns the previous one) of
    the OpenBLAS numpy uses, or None (another BLAS, an older OpenBLAS, not Linux: BLAS then keeps its own threads
    and may oversubscribe the workers). With OpenBLAS's pthreads server, as in numpy's wheels, the setting is
    process-wide, hence ``single_threaded_blas``."""
    for path in openblas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in BLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                return fn
    return None


_blas_lock = threading.Lock()
_blas_users = 0
_blas_before = 0


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS single-threaded while any encode runs; the previous thread count is restored when the last one ends."""
    global _blas_users, _blas_before
    setter = blas_thread_setter()
    with _blas_lock:
        if _blas_users == 0 and setter is not None:
            _blas_before = setter(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and setter is not None and _blas_before > 0:
                setter(_blas_before)


def worker_pool(threads: int) -> ThreadPoolExecutor:
    """``threads`` workers (numpy ufuncs and BLAS release the GIL); use inside ``single_threaded_blas``."""
    return ThreadPoolExecutor(threads, thread_name_prefix="kimivl-vision")
