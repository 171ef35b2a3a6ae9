"""Every csrc/cuda/*.cu compiles with nvcc (nothing CUDA can run on this machine).

Parametrized over the glob, so each engineer's new .cu file is covered without editing this test.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _find_nvcc() -> str | None:
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


NVCC = _find_nvcc()

pytestmark = [pytest.mark.cuda_compile,
              pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")]


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_compiles(cu, tmp_path):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "-I" + os.path.join(ROOT, "csrc", "include"),
           "-gencode", "arch=compute_80,code=sm_80", cu, "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0
