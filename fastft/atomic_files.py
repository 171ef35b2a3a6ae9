"""Replacing a finished folder without a moment in which its path is missing.

Checkpoints, ``final/`` and ``merged/`` are written into a temp folder and then moved into place.
When the target already exists (re-saving the same step, e.g. Ctrl-C right after a periodic save;
a resumed run writing ``final/`` again), deleting it first and renaming second leaves a window in
which a ``kill -9`` loses both: the old copy is gone and the new one still has a temp name that
the next start removes as debris. On Linux the two folders are swapped in one ``renameat2``
(``RENAME_EXCHANGE``), then the old copy - now under the temp name - is deleted.
"""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the complete folder ``src`` to ``dst`` (same file system), replacing a folder already
    at ``dst``: at every moment ``dst`` is either the old or the new complete copy. Without an
    atomic exchange the old copy is first moved aside to ``.<name>.replaced`` (kept if the process
    dies before the new one is in place) and deleted afterwards."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    if not _exchange(src, dst):
        aside = dst.with_name(f".{dst.name}.replaced")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(dst, aside)
        os.replace(src, dst)
        src = aside
    shutil.rmtree(src, ignore_errors=True)
