"""csrc/cuda/cross_entropy.cu run on the CPU through the CUDA emulation shim (tests/cuda_emu/) in
its serial mode, through fastft.ops.fused_linear_cross_entropy's real "cuda" code path.

Serial mode runs the threads of a block one at a time, highest threadIdx first between barriers
(tests/cuda_emu/cuda_runtime.h), so a read that is not ordered by a barrier before another
thread's write sees that write on every run. The kernel's old read of the label logit after the
last barrier (while the other warps already overwrote the row with gradients) gave thread 0 a
gradient value in place of x[y], hence a wrong loss, here every time; on a GPU only sometimes.
The block size is cut from 512 to 64 threads (two warps) to keep the emulation fast; the kernel's
reductions are written for any multiple of 32.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import types

import pytest
import torch

from fastft import _backend
from fastft.ops import fused_linear_cross_entropy as fce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found")


def _emulated_source(path: str) -> str:
    src = open(path).read()
    src, n_launch = re.subn(r"([\w:]+(?:<[^<>]*>)?)<<<(.*?)>>>\(", r"emu_launch(\1, \2, ", src, flags=re.S)
    src, n_threads = re.subn(r"constexpr int kThreads = \d+;", "constexpr int kThreads = 64;", src)
    assert n_launch == 2 and n_threads == 1, (n_launch, n_threads)
    return src


def build(tmp_path, path: str):
    """The emulated kernels of ``path`` as a ctypes library (serial mode on)."""
    (tmp_path / "ce_emu.cpp").write_text(_emulated_source(path))
    so = tmp_path / "ce_emu.so"
    cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           "-I" + os.path.join(ROOT, "tests", "cuda_emu"), "-I" + os.path.join(ROOT, "csrc", "cuda"),
           "-I" + os.path.join(ROOT, "csrc", "include"), str(tmp_path / "ce_emu.cpp"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    lib = ctypes.CDLL(str(so))
    lib.emu_set_serial(1)
    return lib


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ce_emu"), os.path.join(ROOT, "csrc", "cuda", "cross_entropy.cu"))


def _fake_ext(lib):
    """Stands in for fastft._C_cuda: the signature of csrc/cuda/cross_entropy_bind.cpp."""
    u64, i64, f32 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_float

    def cross_entropy_chunk(buf, dt, rows, V, ld, y, scale, loss, zterm, correct, smoothing, z_loss, softcap,
                            write_grad, stream):
        err = lib.fastft_cuda_cross_entropy_chunk(u64(buf), ctypes.c_int(dt), i64(rows), i64(V), i64(ld), u64(y),
                                                  u64(scale), u64(loss), u64(zterm), u64(correct), f32(smoothing),
                                                  f32(z_loss), f32(softcap), ctypes.c_int(int(write_grad)), u64(stream))
        assert err == 0, f"cross_entropy_chunk: error {err}"

    return types.SimpleNamespace(cross_entropy_chunk=cross_entropy_chunk, ops=["cross_entropy"])


def _run_cuda_pass(lib, monkeypatch, buf, y, scale, opts):
    monkeypatch.setattr(_backend, "cuda_ext", lambda: _fake_ext(lib))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return fce._chunk_pass_cuda(buf, y, scale, opts, True)


OPTS = [fce._Opts(0.0, 0.0, None), fce._Opts(0.1, 1e-3, 4.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTS, ids=["plain", "smooth-z-cap"])
def test_chunk_pass_matches_torch(lib, monkeypatch, dtype, opts):
    """Loss, z-term, argmax and the in-place gradient vs the pure-PyTorch pass; labels away from
    thread 0's columns (y % 64 != 0), where the race showed."""
    g = torch.Generator().manual_seed(0)
    rows, V = 5, 300
    x = (torch.randn(rows, V, generator=g) * 3).to(dtype)
    y = torch.tensor([5, 77, 130, 299, 64])
    scale = torch.rand(rows, generator=g) + 0.5
    ours_buf, ref_buf = x.clone(), x.clone()
    loss, zt, cor = _run_cuda_pass(lib, monkeypatch, ours_buf, y, scale, opts)
    rl, rz, rc = fce._chunk_pass_torch(ref_buf, y, scale, opts, True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss, rl, **tol)
    torch.testing.assert_close(zt, rz, **tol)
    assert torch.equal(cor, rc)
    torch.testing.assert_close(ours_buf.float(), ref_buf.float(), **tol)


def test_through_the_op(lib, monkeypatch):
    """The op's cuda path end to end (GEMMs by torch, the pass emulated): loss and gradients."""
    monkeypatch.setattr(_backend, "cuda_ext", lambda: _fake_ext(lib))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 16, generator=g).requires_grad_()
    w = torch.randn(200, 16, generator=g).requires_grad_()
    y = torch.randint(0, 200, (9,), generator=g)
    y[3] = -100
    loss = fce._FusedLinearCE.apply(h, w, None, y, -100, OPTS[0], "mean", 4, "cuda")[0]
    gh, gw = torch.autograd.grad(loss, [h, w])
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    ref = fce.fused_linear_cross_entropy_reference(h2, w2, y)
    rh, rw = torch.autograd.grad(ref, [h2, w2])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_out_of_range_label_gives_nan_not_a_trap(lib, monkeypatch):
    x = torch.randn(2, 100)
    loss, _, cor = _run_cuda_pass(lib, monkeypatch, x.clone(), torch.tensor([3, 100]), torch.ones(2), OPTS[0])
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and not cor[1]
