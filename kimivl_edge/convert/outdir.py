"""Where the converted files go, and what can go wrong there: the default directory, the places we never write
(the Hugging Face cache, the installed package), a directory that is a file, read-only or full, and the partial
files a killed conversion left behind.

Every failure is a one-line ``KimiVLError`` that says which of these it is; sizes are printed in B, KB, MB or GB.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from ..errors import KimiVLError, UsageError

__all__ = ["default_outdir", "check_writable", "check_space", "disk_error", "format_size", "remove_stale_partials",
           "hf_hub_cache", "DISK_ERRNOS"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# gguf_out.temp_path: ".<final name>.partial-<pid>", and its ".header" side file while a header is rewritten.
_PARTIAL = re.compile(r"\.(?P<final>.+\.gguf)\.partial-(?P<pid>\d+)(?:\.header)?")


def format_size(n: int) -> str:
    """``n`` bytes in the largest decimal unit that keeps it >= 1 (B, KB, MB, GB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub)."""
    home = os.environ.get("HF_HOME")
    return Path(os.environ.get("HF_HUB_CACHE") or (Path(home) / "hub" if home else
                                                    Path.home() / ".cache/huggingface/hub"))


def default_outdir() -> Path:
    """The current directory: never next to the checkpoint (an HF cache snapshot, or the package's assets/)."""
    return Path.cwd()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _refuse_protected(out: Path) -> None:
    resolved = out.resolve()
    for root, what in ((hf_hub_cache().resolve(), "the Hugging Face cache"),
                       (PACKAGE_DIR, "the installed kimivl_edge package")):
        if _inside(resolved, root):
            raise UsageError(f"output directory {out} is inside {what} ({root}); choose another --outdir")


def _os_reason(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "it is on a read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


def check_writable(out: Path) -> None:
    """``out`` is (or is created as) a directory we may write files into: not a file, not in the HF cache or the
    package, not read-only (checked by creating and removing a probe file: root ignores permission bits)."""
    _refuse_protected(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output directory {out} is a file, not a directory")
    if not out.exists():
        try:
            out.mkdir(parents=True)
        except (FileExistsError, NotADirectoryError):
            raise UsageError(f"cannot create output directory {out}: a parent of it is a file") from None
        except OSError as e:
            raise UsageError(f"cannot create output directory {out}: {_os_reason(e)}") from None
    probe = out / f".kimivl-edge-probe.gguf.partial-{os.getpid()}"  # named like a partial: a SIGKILL's is cleaned
    try:
        probe.touch()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_error(e, out) from None
        raise UsageError(f"cannot write into output directory {out}: {_os_reason(e)}") from None
    probe.unlink(missing_ok=True)


def check_space(out: Path, need: int) -> None:
    """At least ``need`` bytes are free in ``out``."""
    free = shutil.disk_usage(out).free
    if need > free:
        raise UsageError(f"not enough free disk space in {out}: the conversion needs {format_size(need)}, "
                         f"{format_size(free)} free")


def disk_error(e: OSError, where: Path) -> KimiVLError:
    """The one-line error for a write that failed with ENOSPC, EDQUOT or EROFS."""
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the file system is read-only"}.get(e.errno or 0, e.strerror or str(e))
    try:
        free = f" ({format_size(shutil.disk_usage(where).free)} free)" if e.errno != errno.EROFS else ""
    except OSError:
        free = ""
    return KimiVLError(f"cannot write to {where}: {what}{free}; nothing was written")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the partial files of conversions whose process is gone (a SIGKILL leaves them: every other way out
    removes its own); the files of a running conversion are kept. Returns what was removed."""
    removed = []
    for p in sorted(out.iterdir()) if out.is_dir() else ():
        m = _PARTIAL.fullmatch(p.name)
        if m and p.is_file() and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
