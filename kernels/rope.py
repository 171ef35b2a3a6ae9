"""Triton kernel of the fused rotary embedding (fastft.kernels.rope); maths in fastft/ops/rope.py
and csrc/include/fastft/elementwise.h. One program per (b*T + t, head): it loads the two halves
of one head row and the cos/sin of its position, through arbitrary (B, H, T) strides."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastft.kernels._cast import to_out


@triton.jit
def _rope_kernel(x_ptr, y_ptr, c_ptr, s_ptr, T, half, xs_b, xs_h, xs_t, ys_b, ys_h, ys_t, cs_b, cs_t,
                 BACKWARD: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr):
    # x, y: (B, H, T, 2*half) strided, unit stride in the last dim; cos/sin: (B|1, T, 2*half)
    row = tl.program_id(0).to(tl.int64)  # int64: b * stride and t * stride pass 2^31 on big inputs
    h = tl.program_id(1).to(tl.int64)
    b = row // T
    t = row % T
    j = tl.arange(0, BLOCK)
    mask = j < half
    xo = x_ptr + b * xs_b + h * xs_h + t * xs_t
    yo = y_ptr + b * ys_b + h * ys_h + t * ys_t
    co = b * cs_b + t * cs_t
    lo = tl.load(xo + j, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(xo + half + j, mask=mask, other=0.0).to(tl.float32)
    c_lo = tl.load(c_ptr + co + j, mask=mask, other=0.0).to(tl.float32)
    c_hi = tl.load(c_ptr + co + half + j, mask=mask, other=0.0).to(tl.float32)
    s_lo = tl.load(s_ptr + co + j, mask=mask, other=0.0).to(tl.float32)
    s_hi = tl.load(s_ptr + co + half + j, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # transposed rotation
        y_lo = lo * c_lo + hi * s_hi
        y_hi = hi * c_hi - lo * s_lo
    else:
        y_lo = lo * c_lo - hi * s_lo
        y_hi = hi * c_hi + lo * s_hi
    tl.store(yo + j, to_out(y_lo, y_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)
    tl.store(yo + half + j, to_out(y_hi, y_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)


def rope_triton(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cs_strides: tuple[int, int], backward: bool) -> None:
    """x, y: (B, H, T, D) views with unit D stride; cos/sin share ``cs_strides`` (batch, T)."""
    B, H, T, D = x.shape
    half = D // 2
    rne = os.environ.get("TRITON_INTERPRET", "0") == "1" and y.dtype == torch.bfloat16
    _rope_kernel[(B * T, H)](x, y, cos, sin, T, half, *x.stride()[:3], *y.stride()[:3], *cs_strides,
                             BACKWARD=backward, MANUAL_BF16_RNE=rne, BLOCK=triton.next_power_of_2(half))
