"""Triton kernels index past 2^31 elements correctly (int64 offsets), checked on the CPU.

A SwiGLU of 16 x 8192 tokens x 28672, or an RMSNorm/LoRA GEMM over a few billion activation
elements, puts ``pid * BLOCK`` and ``row * stride`` above 2^31; computed in int32 they wrap to
negative offsets and the kernel reads and writes the wrong memory. Here each kernel runs ONE
program under the interpreter whose program id is moved (by patching the interpreter's grid
index) to where its offsets pass 2^31, on tensors whose storage is a sparse memory-mapped file:
many GiB of address space, a few pages of real memory. The storage starts 2^31 elements before
the tensor, so a wrapped offset lands in valid zeros instead of crashing: the test then fails on
a wrong value. The far program's results must equal the same kernel's results at program 0 on
an ordinary small tensor holding the same data.
"""
from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from fastft import _backend

pytestmark = pytest.mark.skipif(not (_backend.triton_available() and _backend.triton_interpret()),
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1, set on CPU by conftest)")

HALF = 2 ** 31


@pytest.fixture
def far(tmp_path):
    """far(n, dtype): an (n,) tensor at element offset 2^31 of a sparse file-backed storage."""
    count = [0]

    def make(n: int, dtype: torch.dtype) -> torch.Tensor:
        count[0] += 1
        path = tmp_path / f"t{count[0]}.bin"
        elem = torch.tensor([], dtype=dtype).element_size()
        total = HALF + n
        with open(path, "wb") as f:
            f.truncate(total * elem)
        return torch.from_file(str(path), shared=True, size=total, dtype=dtype)[HALF:]

    yield make
    # the mappings close with the tensors; the files go with tmp_path


@contextlib.contextmanager
def program_offset(dx: int = 0, dy: int = 0):
    """Run an interpreted launch's programs as if their ids were shifted by (dx, dy)."""
    import triton.runtime.interpreter as interp

    b = interp.interpreter_builder
    b.set_grid_idx = lambda x, y, z: setattr(b, "grid_idx", (x + dx, y + dy, z))
    try:
        yield
    finally:
        del b.set_grid_idx


def _randn(n, dtype, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_swiglu_fwd_bwd(far):
    from fastft.kernels import swiglu as S

    B = S.BLOCK
    pid = HALF // B  # offsets 2^31 .. 2^31 + B - 1
    n = (pid + 1) * B
    g, u, dy, y, dg, du = (far(n, torch.float16) for _ in range(6))
    tail = slice(pid * B, n)
    for i, t in enumerate((g, u, dy)):
        t[tail] = _randn(B, torch.float16, i)
    with program_offset(pid):
        S._swiglu_fwd_kernel[(1,)](g, u, y, n, MANUAL_BF16_RNE=False, BLOCK=B)
        S._swiglu_bwd_kernel[(1,)](g, u, dy, dg, du, n, MANUAL_BF16_RNE=False, BLOCK=B)
    sg, su, sdy = (t[tail].clone() for t in (g, u, dy))
    sy, sdg, sdu = torch.empty_like(sg), torch.empty_like(sg), torch.empty_like(sg)
    S._swiglu_fwd_kernel[(1,)](sg, su, sy, B, MANUAL_BF16_RNE=False, BLOCK=B)
    S._swiglu_bwd_kernel[(1,)](sg, su, sdy, sdg, sdu, B, MANUAL_BF16_RNE=False, BLOCK=B)
    assert sy.abs().max() > 0
    torch.testing.assert_close(y[tail], sy, rtol=0, atol=0)
    torch.testing.assert_close(dg[tail], sdg, rtol=0, atol=0)
    torch.testing.assert_close(du[tail], sdu, rtol=0, atol=0)


def test_rms_norm_fwd_bwd(far):
    from fastft.kernels import rms_norm as R

    n = 4096
    row = HALF // n  # row * n = 2^31
    rows = row + 1
    x, dy, y, dx = (far(rows * n, torch.float16).view(rows, n) for _ in range(4))
    part = far(rows * n, torch.float32).view(rows, n)  # pid * n = 2^31 too (one row per program)
    x[row] = _randn(n, torch.float16, 1)
    dy[row] = _randn(n, torch.float16, 2)
    w = _randn(n, torch.float16, 3)
    rstd = torch.zeros(rows, dtype=torch.float32)
    with program_offset(row):
        R._rms_fwd_kernel[(1,)](x, w, y, rstd, n, 1e-6, MANUAL_BF16_RNE=False, BLOCK=n)
        R._rms_bwd_kernel[(1,)](dy, x, w, rstd, dx, part, rows, n, 1, MANUAL_BF16_RNE=False, BLOCK=n)
    sx, sdy = x[row:].clone(), dy[row:].clone()
    sy, sdx = torch.empty_like(sx), torch.empty_like(sx)
    srstd, spart = torch.zeros(1), torch.zeros(1, n)
    R._rms_fwd_kernel[(1,)](sx, w, sy, srstd, n, 1e-6, MANUAL_BF16_RNE=False, BLOCK=n)
    R._rms_bwd_kernel[(1,)](sdy, sx, w, srstd, sdx, spart, 1, n, 1, MANUAL_BF16_RNE=False, BLOCK=n)
    assert sy.abs().max() > 0 and srstd[0] > 0
    assert rstd[row] == srstd[0]
    torch.testing.assert_close(y[row:], sy, rtol=0, atol=0)
    torch.testing.assert_close(dx[row:], sdx, rtol=0, atol=0)
    torch.testing.assert_close(part[row:], spart, rtol=0, atol=0)


def test_rope(far):
    from fastft.kernels import rope as P

    D, half = 64, 32
    xs_b = 4096  # batch stride of a (B, H=1, T=1, D) view; b * xs_b = 2^31 at b = 2^19
    b = HALF // xs_b
    x, y = far((b + 1) * xs_b, torch.float32), far((b + 1) * xs_b, torch.float32)
    x[b * xs_b: b * xs_b + D] = _randn(D, torch.float32, 1)
    cos, sin = _randn(D, torch.float32, 2).view(1, 1, D), _randn(D, torch.float32, 3).view(1, 1, D)
    for backward in (False, True):
        with program_offset(b):
            P._rope_kernel[(1, 1)](x, y, cos, sin, 1, half, xs_b, D, D, xs_b, D, D, 0, D,
                                   BACKWARD=backward, MANUAL_BF16_RNE=False, BLOCK=half)
        sx, sy = x[b * xs_b: b * xs_b + D].clone(), torch.empty(D)
        P._rope_kernel[(1, 1)](sx, sy, cos, sin, 1, half, D, D, D, D, D, D, 0, D,
                               BACKWARD=backward, MANUAL_BF16_RNE=False, BLOCK=half)
        assert sy.abs().max() > 0
        torch.testing.assert_close(y[b * xs_b: b * xs_b + D], sy, rtol=0, atol=0)


def test_adamw_and_sumsq(far):
    from fastft.kernels import adamw as A

    B = A.BLOCK
    pid = HALF // B
    n = (pid + 1) * B
    tail = slice(pid * B, n)
    p, g, m, v = (far(n, torch.float32) for _ in range(4))
    for i, t in enumerate((p, g, m)):
        t[tail] = _randn(B, torch.float32, i)
    v[tail] = _randn(B, torch.float32, 5).abs()
    ctrl = torch.tensor([0.0, 0.5])
    tab = torch.tensor([-1e-3, 0.3, 0.99])
    small = [t[tail].clone() for t in (p, g, m, v)]
    part = torch.zeros(pid + 1)
    with program_offset(pid):
        A._sumsq_kernel[(1,)](g, part, n, BLOCK=B)
        A._adamw_kernel[(1,)](p, g, m, v, v, m, ctrl, tab, n, 0.1, 0.999, 0.001, 1e-8,
                              AMSGRAD=False, MASTER=False, SPLIT=False, MAXIMIZE=False,
                              MANUAL_BF16_RNE=False, BLOCK=B)
    sp, sg, sm, sv = small
    spart = torch.zeros(1)
    A._sumsq_kernel[(1,)](sg, spart, B, BLOCK=B)
    A._adamw_kernel[(1,)](sp, sg, sm, sv, sv, sm, ctrl, tab, B, 0.1, 0.999, 0.001, 1e-8,
                          AMSGRAD=False, MASTER=False, SPLIT=False, MAXIMIZE=False,
                          MANUAL_BF16_RNE=False, BLOCK=B)
    assert spart[0] > 0 and part[pid] == spart[0]
    for name, big, ref in (("p", p, sp), ("m", m, sm), ("v", v, sv)):
        torch.testing.assert_close(big[tail], ref, rtol=0, atol=0, msg=name)


def test_lora_mm(far):
    from fastft.kernels import lora_linear as L

    K, N, K2, BM, BN, BK = 64, 64, 16, 32, 32, 32
    pid_m = HALF // K // BM  # rows rm = pid_m * BM: rm * K = 2^31 (a and c)
    rows = (pid_m + 1) * BM
    a = far(rows * K, torch.float32).view(rows, K)
    c = far(rows * N, torch.float32).view(rows, N)
    u = far(rows * K2, torch.float32).view(rows, K2)
    tail = slice(pid_m * BM, rows)
    a[tail] = _randn(BM * K, torch.float32, 1).view(BM, K)
    u[tail] = _randn(BM * K2, torch.float32, 2).view(BM, K2)
    b = _randn(K * N, torch.float32, 3).view(K, N)
    vv = _randn(K2 * N, torch.float32, 4).view(K2, N)
    args = dict(IS_INT8=False, SCALE_ON_K=False, HAS_LR=True, HAS_BIAS=False, UPCAST=True, IEEE=True,
                BM=BM, BN=BN, BK=BK, BK2=16)
    with program_offset(pid_m):
        L._lora_mm_kernel[(1, 2)](a, b, b, u, vv, b, c, rows, N, K, K2, K, N, 1, K2, N, 1, N, **args)
    sa, su, sc = a[tail].clone(), u[tail].clone(), torch.empty(BM, N)
    L._lora_mm_kernel[(1, 2)](sa, b, b, su, vv, b, sc, BM, N, K, K2, K, N, 1, K2, N, 1, N, **args)
    torch.testing.assert_close(sc, sa @ b + su @ vv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c[tail], sc, rtol=0, atol=0)


def test_cross_entropy_rows(far):
    """Already int64 (row * stride): kept here so it stays so."""
    from fastft.kernels import fused_linear_cross_entropy as C

    V = 4096
    row = HALF // V
    buf = far((row + 1) * V, torch.float32).view(row + 1, V)
    buf[row] = _randn(V, torch.float32, 1)
    y = torch.full((row + 1,), 7, dtype=torch.int64)
    scale = torch.ones(row + 1)
    loss, zt, cor = torch.zeros(row + 1), torch.zeros(row + 1), torch.zeros(row + 1, dtype=torch.uint8)
    kw = dict(CAP=False, WRITE_GRAD=True, MANUAL_BF16_RNE=False, BLOCK_V=1024)
    sbuf = buf[row:].clone()
    with program_offset(row):
        C._ce_chunk_kernel[(1,)](buf, V, y, scale, loss, zt, cor, V, 0.0, 0.0, 1.0, **kw)
    sl, sz, sc = torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.uint8)
    C._ce_chunk_kernel[(1,)](sbuf, V, y, scale, sl, sz, sc, V, 0.0, 0.0, 1.0, **kw)
    assert sl[0] > 0 and loss[row] == sl[0]
    torch.testing.assert_close(buf[row:], sbuf, rtol=0, atol=0)


def test_fails_on_int32_offsets(far, tmp_path):
    """The method catches the bug: a copy of the SwiGLU kernel with int32 offsets gets it wrong."""
    src = tmp_path / "k32.py"
    src.write_text(
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\n"
        "def k32(x_ptr, y_ptr, n, BLOCK: tl.constexpr):\n"
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
        "    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)\n")
    spec = importlib.util.spec_from_file_location("k32", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    B = 1024
    pid = HALF // B
    n = (pid + 1) * B
    x, y = far(n, torch.float32), far(n, torch.float32)
    x[pid * B:] = 1.0
    with program_offset(pid):
        mod.k32[(1,)](x, y, n, BLOCK=B)
    assert not torch.equal(y[pid * B:], torch.full((B,), 2.0))  # int32: wrote 2^31 elements too low
