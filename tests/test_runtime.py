"""fastft/runtime.py: the ``fastft`` command puts glibc malloc on transparent huge pages by
re-executing itself once; the user's own setting and FASTFT_HUGEPAGES=0 win; the bench's HF side
gets the user's environment back."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastft.runtime import ORIGINAL, TUNABLE, hugepage_env, stock_env

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")


@linux_only
def test_tunable_is_added_and_the_original_is_kept():
    env = hugepage_env({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == TUNABLE and env[ORIGINAL] == "" and env["PATH"] == "/bin"
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert env[ORIGINAL] == "glibc.malloc.arena_max=2"


@pytest.mark.parametrize("env", [
    {"FASTFT_HUGEPAGES": "0"},                         # switched off
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},      # the user chose
    {ORIGINAL: "", "GLIBC_TUNABLES": TUNABLE},          # already re-executed: never loop
])
def test_nothing_to_do(env):
    assert hugepage_env(env) is None


def test_stock_env_restores_what_the_user_had():
    assert "GLIBC_TUNABLES" not in stock_env({ORIGINAL: "", "GLIBC_TUNABLES": TUNABLE, "A": "1"})
    back = stock_env({ORIGINAL: "glibc.malloc.arena_max=2", "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"})
    assert back == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert stock_env({"GLIBC_TUNABLES": "x"}) == {"GLIBC_TUNABLES": "x"}  # never re-executed: untouched


def _env_malloc_line(extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", ORIGINAL, "FASTFT_HUGEPAGES")}
    env.update(extra)
    out = subprocess.run([sys.executable, "-m", "fastft.cli", "env"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return next(line for line in out.stdout.splitlines() if line.startswith("malloc:"))


@linux_only
def test_fastft_command_runs_on_huge_pages_unless_switched_off():
    assert "huge pages" in _env_malloc_line({})
    assert "default pages" in _env_malloc_line({"FASTFT_HUGEPAGES": "0"})
    assert "default pages" in _env_malloc_line({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


_HEAP_PROBE = """
import sys, torch
from fastft.runtime import release_free_heap

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

keep = []
big = torch.ones(1024, 1024)
del big  # a freed 4 MiB mapping lifts malloc's dynamic mmap threshold above 1 MiB
junk = [torch.ones(256, 1024) for _ in range(300)]  # so these 300 x 1 MiB come from the heap, as a step's tensors do
keep.append(torch.ones(128, 1024))  # 512 KiB allocated last: the heap's top stays in use, only its middle frees
del junk
before = rss_anon()
ran = release_free_heap()
print(ran, before - rss_anon())
"""


@pytest.mark.parametrize("huge", [False, True])
@linux_only
def test_release_free_heap_returns_freed_heap_pages(huge):
    """300 MiB of freed 1 MiB tensors stay resident in malloc's heap; ``release_free_heap`` gives
    them back (on default and on huge-page malloc), and ``FASTFT_TRIM_HEAP=0`` turns it off."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FASTFT_TRIM_HEAP")}
    if huge:
        env["GLIBC_TUNABLES"] = TUNABLE
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env=env, capture_output=True, text=True, check=True)
    ran, freed = out.stdout.split()
    if ran == "False":
        pytest.skip("no glibc malloc_trim")
    assert float(freed) > 200, out.stdout
    off = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env={**env, "FASTFT_TRIM_HEAP": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert off[0] == "False" and float(off[1]) < 50, off
