"""The page cache of a set of files, for cold-start runs: how much of them is resident, and dropping them from it.

``evict`` flushes each file (``fsync``: dirty pages cannot be dropped) and asks the kernel to drop its cached pages
(``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``), which needs no root for clean pages that no process maps.
``resident_fraction`` checks the result: it maps each file read-only (``mmap`` through libc, without touching a
page) and counts its resident pages with ``mincore``. Linux (and other systems with both calls) only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import KimiVLError

_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    return libc


def resident_pages(path: str | os.PathLike) -> tuple[int, int]:
    """(resident pages, pages) of ``path`` in the page cache, by ``mincore`` on a fresh read-only mapping."""
    size = Path(path).stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    if pages == 0:
        return 0, 0
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise KimiVLError(f"mmap of {path} failed: {os.strerror(ctypes.get_errno())}")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise KimiVLError(f"mincore on {path} failed: {os.strerror(ctypes.get_errno())}")
            return sum(b & 1 for b in vec), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: Iterable[str | os.PathLike]) -> float:
    """The fraction of the pages of ``paths`` (all together) that the page cache holds."""
    counts = [resident_pages(p) for p in paths]
    total = sum(n for _, n in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


def evict(paths: Iterable[str | os.PathLike]) -> float:
    """Drop ``paths`` from the page cache; the fraction still resident afterwards (``resident_fraction``).
    Pages another process has mapped stay: a cold run needs no other process holding the files."""
    if not hasattr(os, "posix_fadvise"):
        raise KimiVLError("dropping files from the page cache needs posix_fadvise (Linux)")
    paths = list(paths)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(paths)
