"""Process settings the ``fastft`` command applies before torch is loaded.

Transparent huge pages for glibc malloc (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35;
older versions ignore the tunable). torch's CPU tensors come from glibc malloc. Many Linux
systems (Debian, Ubuntu) run THP in "madvise" mode, and there malloc hands out 4 KiB pages. The
tunable makes malloc ask for huge pages instead, which cuts the GEMMs' TLB misses.

Measured here (2-core EPYC, SmolLM2-135M LoRA step 4x256, alternating 10-step runs): 1.715 / 1.713 s
with the tunable vs 1.863 / 1.822 s without. Peak RSS was unchanged (1212-1236 vs 1208-1220 MB).

The dynamic loader reads the tunable only at process start, so the command re-executes itself
once with it added (:func:`reexec_with_hugepages`, before anything imports torch). The user's
environment wins: an explicit ``glibc.malloc.hugetlb`` setting is kept, and ``FASTFT_HUGEPAGES=0``
turns this off. ``fastft bench`` runs its Hugging Face side with the environment the user started
fastft with (:func:`stock_env`), so that side stays stock.

:func:`release_free_heap` (``malloc_trim``) gives the free pages inside malloc's heaps back to the
system at one point of a step where that lowers the peak (``FASTFT_TRIM_HEAP=0`` turns it off).
"""
from __future__ import annotations

import ctypes
import os
import sys

SWITCH = "FASTFT_HUGEPAGES"
ORIGINAL = "FASTFT_ORIGINAL_GLIBC_TUNABLES"  # the user's value, kept so children can get it back
TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_env(env: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to add."""
    if not sys.platform.startswith("linux") or env.get(SWITCH, "1") == "0" or ORIGINAL in env:
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:  # the user chose
        return None
    new = dict(env)
    new[ORIGINAL] = current
    new["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return new


# ``python -c`` puts the current folder first on sys.path and ``python -m`` does too; either would
# let a user's own ``kernels.py`` / ``data.py`` (or a clone's root folder) shadow what fastft and
# transformers import (issue 16). The child therefore drops that first entry before importing
# anything. (``python -P`` does the same but only exists from Python 3.11; we support 3.10.)
_CHILD = "import sys; del sys.path[0]; from fastft.cli import main; main()"


def child_argv(argv: list[str]) -> list[str]:
    """The command line of the re-executed ``fastft``: never the caller's folder on sys.path."""
    return [sys.executable, "-c", _CHILD, *argv]


def reexec_with_hugepages(argv: list[str]) -> None:
    """Re-run fastft (:func:`child_argv`) with the tunable set; returns only when it is not
    needed or not possible (torch already loaded, exec failed)."""
    env = hugepage_env(dict(os.environ))
    if env is None or "torch" in sys.modules or not sys.executable:
        return
    try:
        os.execve(sys.executable, child_argv(argv), env)
    except OSError:
        return


def stock_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` as the user had it before :func:`reexec_with_hugepages` (the bench's HF side)."""
    out = dict(env)
    if ORIGINAL not in out:
        return out
    original = out.pop(ORIGINAL)
    if original:
        out["GLIBC_TUNABLES"] = original
    else:
        out.pop("GLIBC_TUNABLES", None)
    return out


def describe(env: dict[str, str] | None = None) -> str:
    """One line for ``fastft env`` / ``fastft bench``: the malloc page setting of a process."""
    tun = (os.environ if env is None else env).get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=1" in tun or "glibc.malloc.hugetlb=2" in tun:
        return "glibc malloc on transparent huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb)"
    return "glibc malloc default pages"


TRIM_SWITCH = "FASTFT_TRIM_HEAP"
_TRIM = []  # [malloc_trim or None], looked up once


def release_free_heap() -> bool:
    """``malloc_trim(0)``: return the free pages inside glibc malloc's heaps to the system.

    Freed tensors below malloc's mmap threshold (32 MiB at most) stay in its heaps, resident;
    larger ones are fresh mappings. So a step's big late allocations (the fused cross-entropy's
    (V, H) weight gradient and chunk buffer, on top of every activation) add to pages the heap
    holds free. Full fine-tuning, SmolLM2-135M fp32 4x256 on huge-page malloc: ~260 MB of the heap
    was free at that point, and trimming there lowered the step's peak RSS by 160 MB
    (benchmarks/README.md). Costs one walk over the free chunks plus page faults when the heap
    reuses the pages. Returns whether it ran (False: not glibc, or ``FASTFT_TRIM_HEAP=0``).
    """
    if os.environ.get(TRIM_SWITCH, "1") == "0":
        return False
    if not _TRIM:
        try:
            fn = ctypes.CDLL(None).malloc_trim  # glibc only (musl, macOS: none)
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _TRIM.append(fn)
    if _TRIM[0] is None:
        return False
    _TRIM[0](0)
    return True
