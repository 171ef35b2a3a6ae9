"""Rounding helper shared by the elementwise Triton kernels (rms_norm, swiglu, rope)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_out(x, out_ty: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr):
    """fp32 ``x`` rounded to ``out_ty`` (round to nearest even).

    The Triton interpreter's fp32->bf16 cast truncates (triton 3.9 interpreter.py, see
    kernels/adamw.py), so under the interpreter the launchers set ``MANUAL_BF16_RNE`` and bf16
    is rounded by hand; on GPUs the plain cast is already RNE."""
    if MANUAL_BF16_RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ty)
