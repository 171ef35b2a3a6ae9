"""Triton kernels of the fused RMSNorm (fastft.kernels.rms_norm); maths in fastft/ops/rms_norm.py
and csrc/include/fastft/elementwise.h. One program per row forward (the row fits in one block:
hidden sizes are <= 16K); backward programs each walk a contiguous range of rows and write one
fp32 partial of dweight, summed on the device by the host code (deterministic, no atomics)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastft.kernels._cast import to_out


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, MANUAL_BF16_RNE: tl.constexpr,
                    BLOCK: tl.constexpr):
    # x, y: (rows, n) contiguous; w: (n,); rstd: (rows,) fp32
    row = tl.program_id(0).to(tl.int64)  # int64: offsets pass 2^31 elements on big activations (tests/test_int64_offsets.py)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rs = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / n + eps)
    tl.store(rstd_ptr + row, rs)
    # normalised row rounded to x's dtype before the weight multiply (HF LlamaRMSNorm)
    nr = to_out(x * rs, y_ptr.dtype.element_ty, MANUAL_BF16_RNE).to(tl.float32)
    tl.store(y_ptr + row * n + cols, to_out(nr * w, y_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)


@triton.jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, rows, n, rows_per_prog,
                    MANUAL_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr):
    # dw_part: (programs, n) fp32, this program's sum over its rows of dy * round(x * rstd)
    pid = tl.program_id(0).to(tl.int64)  # int64: r * n and pid * n pass 2^31 on big inputs
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_prog
    # r = start + i keeps r int64 (the interpreter types a range's loop variable int32)
    for i in range(0, tl.minimum(start + rows_per_prog, rows) - start):
        r = start + i
        x = tl.load(x_ptr + r * n + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * n + cols, mask=mask, other=0.0).to(tl.float32)
        rs = tl.load(rstd_ptr + r)
        nh = x * rs
        dw += dy * to_out(nh, x_ptr.dtype.element_ty, MANUAL_BF16_RNE).to(tl.float32)
        dn = dy * w
        c = tl.sum(dn * nh, axis=0) / n
        tl.store(dx_ptr + r * n + cols, to_out(rs * (dn - nh * c), dx_ptr.dtype.element_ty, MANUAL_BF16_RNE),
                 mask=mask)
    tl.store(dw_part_ptr + pid * n + cols, dw, mask=mask)


def _rne(t: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and t.dtype == torch.bfloat16


def rms_norm_fwd_triton(x2, w, y, rstd, eps: float) -> None:
    """x2, y: (rows, n) contiguous one dtype; w: (n,) same dtype or fp32 (loaded as fp32 either way);
    rstd: (rows,) fp32 out."""
    rows, n = x2.shape
    _rms_fwd_kernel[(rows,)](x2, w, y, rstd, n, eps, MANUAL_BF16_RNE=_rne(y), BLOCK=triton.next_power_of_2(n))


def rms_norm_bwd_triton(dy2, x2, w, rstd, dx, dw) -> None:
    """dx: (rows, n) out; dw: (n,) fp32 out (partials summed in fp32, program order)."""
    rows, n = x2.shape
    progs = min(rows, 256)
    per = triton.cdiv(rows, progs)
    progs = triton.cdiv(rows, per)
    part = torch.empty(progs, n, dtype=torch.float32, device=x2.device)
    _rms_bwd_kernel[(progs,)](dy2, x2, w, rstd, dx, part, rows, n, per, MANUAL_BF16_RNE=_rne(dx),
                              BLOCK=triton.next_power_of_2(n))
    torch.sum(part, 0, out=dw)
