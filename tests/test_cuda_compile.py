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


def _setup_gencode():
    """setup.py's _cuda_gencode, loaded without running setup() (which the import would do)."""
    import ast

    src = open(os.path.join(ROOT, "setup.py")).read()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "_cuda_gencode")
    ns = {"os": os}
    exec(compile(ast.Module([fn], []), "setup.py", "exec"), ns)
    return ns["_cuda_gencode"]


def test_gencode_adds_ptx_for_the_highest_arch():
    gencode = _setup_gencode()
    flags = gencode("80;90")
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert pairs == ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                     "arch=compute_90,code=compute_90"]
    assert gencode("8.6, 9.0a ,")[-1] == "arch=compute_90a,code=compute_90a"
    assert gencode("120;90")[-1] == "arch=compute_120,code=compute_120"
    assert gencode("") == []


def test_cu_compiles_with_ptx(tmp_path):
    """The build's flags (SASS + PTX) on one file; cuobjdump, when present, finds the PTX."""
    cu = os.path.join(ROOT, "csrc", "cuda", "cross_entropy.cu")
    out = tmp_path / "ce.o"
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "-I" + os.path.join(ROOT, "csrc", "include"), cu, "-o", str(out)]
    cmd += _setup_gencode()("80")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cuobjdump = shutil.which("cuobjdump") or (os.path.join(os.path.dirname(NVCC), "cuobjdump"))
    if os.path.exists(cuobjdump):
        listing = subprocess.run([cuobjdump, "-lptx", str(out)], capture_output=True, text=True).stdout
        assert "sm_80" in listing or "compute_80" in listing, listing
