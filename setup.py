"""Build the C++ extensions of fastft.

* ``fastft._C``      - CPU kernels (csrc/cpu/*.cpp), pybind11, C++17, OpenMP, -O3.
  No ``-march=native``: hot loops carry GCC ``target_clones`` so one binary picks
  AVX-512, AVX2 or scalar code at load time on any x86-64 CPU.
* ``fastft._C_cuda`` - CUDA kernels (csrc/cuda/*.cu), built only when ``nvcc`` is found
  and ``FASTFT_NO_CUDA`` is not 1, for the architectures in ``FASTFT_CUDA_ARCHS``
  (default ``80;90``; SASS for each, PTX for the highest so newer GPUs JIT-compile it).

Both talk to Python through raw pointers and sizes validated on the Python side, so
neither links against torch and the build never imports torch.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = sorted(glob.glob("csrc/cpu/*.cpp"))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu"))
CUDA_HOST_SOURCES = sorted(glob.glob("csrc/cuda/*.cpp"))
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def _find_nvcc() -> str | None:
    if os.environ.get("FASTFT_NO_CUDA", "0") == "1":
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
                nvcc = os.path.join(root, "bin", "nvcc")
                break
    return nvcc


def _cuda_gencode(value: str | None = None) -> list[str]:
    """nvcc -gencode flags: SASS (``sm_XX``) for every arch of ``FASTFT_CUDA_ARCHS`` (``80;90``,
    ``8.0,9.0`` or ``90a`` forms) plus PTX (``compute_XX``) for the highest one, so a newer GPU
    outside the list JIT-compiles the PTX at load time instead of failing to launch."""
    value = os.environ.get("FASTFT_CUDA_ARCHS", "80;90") if value is None else value
    archs = [a.strip().replace(".", "") for a in value.replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if archs:
        top = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit()) or 0))
        flags += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    return flags


class BuildExt(build_ext):
    """build_ext that hands ``.cu`` files to nvcc and everything else to the C++ compiler."""

    def build_extensions(self):
        nvcc = _find_nvcc()
        self.compiler.src_extensions.append(".cu")
        default_compile = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if src.endswith(".cu"):
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
                       "-Xcompiler", "-fPIC", "-I" + os.path.join(HERE, "csrc", "include")]
                cmd += _cuda_gencode() + [a for a in pp_opts if a.startswith("-I")]
                self.spawn(cmd)
            else:
                default_compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


# Compile the source files of an extension in parallel (FASTFT_BUILD_JOBS, default: every core):
# benchmarks/gpu_check.sh builds both extensions inside its 8-minute budget.
ParallelCompile("FASTFT_BUILD_JOBS", default=0).install()

include_dirs = [os.path.join("csrc", "include")]
ext_modules = [
    Pybind11Extension(
        "fastft._C",
        CPU_SOURCES,
        include_dirs=include_dirs,
        cxx_std=17,
        # -fno-trapping-math: without it GCC will not if-convert the float selects of exp_f /
        # softmax (a compare may raise an FP exception flag), so every loop with one stayed scalar
        # in the AVX2 clone (AVX-512's masked ops were exempt): SwiGLU fwd 1024x1536 fp32, one
        # core, AVX2-only EPYC: 11.5 ms -> 1.3 ms with the x86-64-v3 clone. Results are unchanged;
        # no fastft kernel reads FP exception flags.
        extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"] + OPENMP,
        extra_link_args=OPENMP,
    )
]

_nvcc = _find_nvcc()
if _nvcc and CUDA_SOURCES:
    # nvcc may be a wrapper script (here /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc):
    # take the first candidate root that really holds libcudart.
    _roots = [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(_nvcc))),
              "/usr/local/cuda"]
    cuda_root = next((r for r in _roots if r and glob.glob(os.path.join(r, "lib64", "libcudart.so*"))),
                     _roots[1])
    ext_modules.append(
        Pybind11Extension(
            "fastft._C_cuda",
            CUDA_HOST_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs + [os.path.join(cuda_root, "include")],
            library_dirs=[os.path.join(cuda_root, "lib64")],
            libraries=["cudart"],
            runtime_library_dirs=[os.path.join(cuda_root, "lib64")],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
