"""Triton kernels of the fused SwiGLU gate (fastft.kernels.swiglu); maths in fastft/ops/swiglu.py
and csrc/include/fastft/elementwise.h. Flat contiguous tensors, fp32 maths, one rounding per output."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastft.kernels._cast import to_out

BLOCK = 1024  # elements per program: 4 KiB of fp32 per stream


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, MANUAL_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr):
    # g, u, y: (n,) one dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: offsets pass 2^31 elements on big activations (tests/test_int64_offsets.py)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(y_ptr + offs, to_out(g * s * u, y_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, n, MANUAL_BF16_RNE: tl.constexpr,
                       BLOCK: tl.constexpr):
    # sigmoid recomputed from g: nothing but the inputs is saved by the forward
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: offsets pass 2^31 elements on big activations (tests/test_int64_offsets.py)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dg_ptr + offs, to_out(dg, dg_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)
    tl.store(du_ptr + offs, to_out(du, du_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mask)


def _rne(t: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and t.dtype == torch.bfloat16


def swiglu_fwd_triton(g: torch.Tensor, u: torch.Tensor, y: torch.Tensor) -> None:
    """y = silu(g) * u for contiguous same-dtype g, u, y (any shape)."""
    n = g.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, y, n, MANUAL_BF16_RNE=_rne(y), BLOCK=BLOCK)


def swiglu_bwd_triton(g, u, dy, dg, du) -> None:
    """dg, du of y = silu(g) * u for contiguous same-dtype tensors."""
    n = g.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, dy, dg, du, n, MANUAL_BF16_RNE=_rne(dg), BLOCK=BLOCK)
