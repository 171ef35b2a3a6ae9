"""csrc/cuda/attention.cu run on the CPU through a CUDA emulation shim (tests/cuda_emu/), through
fastft.ops.attention's real "cuda" code path, against the fp32 reference.

No GPU here, so the kernels would otherwise only be compiled. The test rewrites the `<<<...>>>`
launches and the `extern __shared__` declaration, compiles the file with g++ against
tests/cuda_emu/cuda_runtime.h (one OS thread per CUDA thread, barriers for __syncthreads and the
warp shuffles) and loads its C launchers with ctypes in place of fastft._C_cuda. This checks the
kernels' indexing, masking, tiling, GQA reduction, launch sizes, shared-memory sizes and the
argument order the Python op passes; it does not check GPU-only behaviour (warp divergence,
memory ordering beyond barriers, fast-math intrinsics, real occupancy). The per-element maths
comes from csrc/include/fastft/attention.h as in the CPU build.

Inputs are views into NaN-filled buffers (a read outside a tensor's rows, heads or head dim turns
into NaN), outputs are pre-filled with NaN (an element the kernels do not write stays NaN), and
the shim poisons shared memory the same way.
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
from test_attention import NAMES, _reference, _sdpa

from fastft import _backend
from fastft.ops import attention as attn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("g++")
# ~30 s on 2 shared cores, half of it compiling the emulated kernels
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CXX is None, reason="g++ not found")]

# (B, Hq, Hkv, T, D): head-dim buckets 64 (32-row tiles, 4 lanes a row), 128, 256 (16-row tiles,
# 8 lanes a row); T not a multiple of the tiles; GQA groups 1, 2, 3; T = 1
SHAPES = [(2, 3, 1, 37, 16), (1, 4, 2, 45, 72), (1, 2, 1, 21, 200), (2, 4, 1, 1, 8)]
_ids = lambda s: "x".join(map(str, s))  # noqa: E731


def _emulated_source() -> str:
    src = open(os.path.join(ROOT, "csrc", "cuda", "attention.cu")).read()
    src, n_launch = re.subn(r"(\w+)<<<(.*?)>>>\(", r"emu_launch(\1, \2, ", src, flags=re.S)
    src, n_smem = re.subn(r"extern __shared__ float (\w+)\[\];", r"float* \1 = emu::smem;", src)
    assert n_launch == 3 and n_smem == 3, (n_launch, n_smem)  # fwd, dK/dV, dQ
    return src


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "attention_emu.cpp").write_text(_emulated_source())
    so = d / "attention_emu.so"
    cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           "-I" + os.path.join(ROOT, "tests", "cuda_emu"), "-I" + os.path.join(ROOT, "csrc", "cuda"),
           "-I" + os.path.join(ROOT, "csrc", "include"), str(d / "attention_emu.cpp"), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return ctypes.CDLL(str(so))


def _fake_ext(lib):
    """Stands in for fastft._C_cuda: same call signatures as csrc/cuda/attention_bind.cpp."""
    i64, u64 = ctypes.c_int64, ctypes.c_uint64
    s3 = lambda s: (i64 * 3)(*s)  # noqa: E731

    def fwd(q, qs, k, ks, v, vs, o, os_, lse, B, Hq, Hkv, T, D, scale, dt, stream, seg_start=0):
        err = lib.fastft_cuda_attention_fwd(u64(q), s3(qs), u64(k), s3(ks), u64(v), s3(vs), u64(o), s3(os_), u64(lse),
                                            i64(B), i64(Hq), i64(Hkv), i64(T), i64(D), ctypes.c_float(scale),
                                            ctypes.c_int(dt), u64(stream), u64(seg_start))
        assert err == 0, f"attention_fwd: error {err}"

    def bwd(q, qs, k, ks, v, vs, o, os_, do, dos, lse, dq, dqs, dk, dks, dv, dvs, B, Hq, Hkv, T, D, scale, dt, stream,
            seg_start=0, seg_end=0):
        err = lib.fastft_cuda_attention_bwd(u64(q), s3(qs), u64(k), s3(ks), u64(v), s3(vs), u64(o), s3(os_), u64(do),
                                            s3(dos), u64(lse), u64(dq), s3(dqs), u64(dk), s3(dks), u64(dv), s3(dvs),
                                            i64(B), i64(Hq), i64(Hkv), i64(T), i64(D), ctypes.c_float(scale),
                                            ctypes.c_int(dt), u64(stream), u64(seg_start), u64(seg_end))
        assert err == 0, f"attention_bwd: error {err}"

    return types.SimpleNamespace(attention_fwd=fwd, attention_bwd=bwd, ops=["attention"])


@pytest.fixture
def emulated_cuda(lib, monkeypatch):
    """Route fastft.ops.attention's "cuda" backend to the emulated kernels, with NaN-filled outputs."""
    monkeypatch.setattr(_backend, "cuda_ext", lambda: _fake_ext(lib))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    bthd = attn._bthd
    monkeypatch.setattr(attn, "_bthd", lambda *a: bthd(*a).fill_(float("nan")))

    def run(q, k, v, dout, scale=None, segments=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = attn._AttentionFn.apply(q, k, v, scale, "cuda", segments)
        out.backward(dout)
        return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]

    return run


def _padded_inputs(shape, dtype, seed=0):
    """q, k, v as (B, H, T, D) views of NaN-filled (B, T + 3, H + 1, D + 5) buffers (HF-like
    strided layout with a head-dim row stride that is not D); dout contiguous."""
    b, hq, hkv, t, d = shape
    g = torch.Generator().manual_seed(seed)

    def make(h):
        buf = torch.full((b, t + 3, h + 1, d + 5), float("nan"), dtype=dtype)
        view = buf[:, :t, :h, :d]
        view.copy_(torch.randn(b, t, h, d, generator=g).to(dtype))
        return view.transpose(1, 2)

    q, k, v = make(hq), make(hkv), make(hkv)
    return q, k, v, torch.randn(b, hq, t, d, generator=g).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_fp32_matches_reference(shape, emulated_cuda):
    q, k, v, dout = _padded_inputs(shape, torch.float32)
    ours = emulated_cuda(q, k, v, dout)
    for name, a, r in zip(NAMES, ours, _reference(q, k, v, dout)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6 * max(r.abs().max().item(), 1.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=_ids)
def test_low_precision_error_within_2x_of_sdpa(shape, dtype, emulated_cuda):
    q, k, v, dout = _padded_inputs(shape, dtype)
    ref = _reference(q, k, v, dout)
    ours = emulated_cuda(q, k, v, dout)
    qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = _sdpa(qq, kk, vv)
    o.backward(dout)
    torch_own = [o.detach().float(), qq.grad.float(), kk.grad.float(), vv.grad.float()]
    for name, a, t, r in zip(NAMES, ours, torch_own, ref):
        scale = r.abs().max().item()
        err, terr = (a - r).abs().max().item(), (t - r).abs().max().item()
        assert err <= 2 * terr + 1e-3 * scale, f"{name}: {err:.3g} vs SDPA {dtype} {terr:.3g}"


def _reference_scaled(q, k, v, dout, scale):
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = attn.attention_reference(q, k, v, scale=scale)
    out.backward(dout.float())
    return [out.detach(), q.grad, k.grad, v.grad]


def test_custom_scale(emulated_cuda):
    q, k, v, dout = _padded_inputs((1, 2, 2, 19, 24), torch.float32)
    ours = emulated_cuda(q, k, v, dout, scale=0.37)
    ref = _reference_scaled(q, k, v, dout, 0.37)
    for name, a, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6 * max(r.abs().max().item(), 1.0), msg=name)


def test_launcher_rejects_bad_shapes(lib):
    """The C launchers refuse what the kernels cannot do (the pybind layer checks first)."""
    s, p = (ctypes.c_int64 * 3)(64, 32, 8), ctypes.c_uint64(0)
    args = lambda D, Hq, Hkv, dt: (p, s, p, s, p, s, p, s, p, ctypes.c_int64(1), ctypes.c_int64(Hq),  # noqa: E731
                                   ctypes.c_int64(Hkv), ctypes.c_int64(4), ctypes.c_int64(D), ctypes.c_float(0.5),
                                   ctypes.c_int(dt), p, p)
    assert lib.fastft_cuda_attention_max_head_dim() == 256
    assert lib.fastft_cuda_attention_fwd(*args(257, 2, 1, 0)) != 0
    assert lib.fastft_cuda_attention_fwd(*args(8, 3, 2, 0)) != 0
    assert lib.fastft_cuda_attention_fwd(*args(8, 2, 1, 7)) != 0


# Packed rows (sample layouts from tests/test_attention_packed.py): the emulated kernels against
# the reference with the same segments, fp32 and bf16, outputs and every gradient.
@pytest.mark.parametrize("layout", ["one", "ones", "cross", "tail", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_match_reference(layout, dtype, emulated_cuda):
    _packed_case((2, 4, 2, 45, 16), layout, dtype, emulated_cuda)


def test_packed_rows_16_row_tiles(emulated_cuda):
    """Head dim 200: the 16-row tiles (8 lanes a row), samples crossing them."""
    _packed_case((1, 2, 1, 37, 200), "cross", torch.float32, emulated_cuda)


def _packed_case(shape, layout, dtype, emulated_cuda):
    from test_attention_packed import LAYOUTS, check_against_reference

    q, k, v, dout = _padded_inputs(shape, dtype)
    seg = LAYOUTS[layout](shape[0], shape[3])
    ours = emulated_cuda(q, k, v, dout, segments=seg)
    check_against_reference(ours, q, k, v, dout, seg)


def test_backward_needs_both_segment_tables(lib):
    s, p = (ctypes.c_int64 * 3)(64, 32, 8), ctypes.c_uint64(0)
    one = ctypes.c_uint64(8)  # never read: the launcher refuses first
    i64 = ctypes.c_int64
    err = lib.fastft_cuda_attention_bwd(p, s, p, s, p, s, p, s, p, s, p, p, s, p, s, p, s, i64(1), i64(2), i64(1),
                                        i64(4), i64(8), ctypes.c_float(0.5), ctypes.c_int(0), p, one, p)
    assert err != 0
