"""Triton per-chunk pass of the fused linear cross-entropy (fastft.kernels.fused_linear_cross_entropy).

fastft/ops/fused_linear_cross_entropy.py computes a chunk's logits with one GEMM (cuBLAS) into a
(rows, V) buffer; this kernel does the rest in one program per row:
  1. online max / sum-exp over the row in BLOCK_V tiles (one read), plus sum of the capped logits
     (label smoothing) and the first argmax;
  2. a second sweep overwrites the logits with dloss/dlogits (scaled by the row's reduction
     scale), the label element included.
Maths as csrc/include/fastft/cross_entropy.h. No tl.dot here, so the interpreter's bf16 dot
problem (shared/ENVIRONMENT.md) does not arise; loads upcast to fp32, stores round once.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _capped(x, softcap, CAP: tl.constexpr):
    if CAP:
        # cap * tanh(x / cap) = cap * (1 - 2 / (exp(2x / cap) + 1))
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
    return x


@triton.jit
def _ce_chunk_kernel(buf_ptr, stride_row, y_ptr, scale_ptr, loss_ptr, z_ptr, correct_ptr, V,
                     smoothing, z_loss, softcap,
                     CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    # buf: (rows, V) logits, fp32/bf16/fp16, overwritten by the gradient; y: (rows,) int64;
    # scale: (rows,) fp32; loss, z: (rows,) fp32; correct: (rows,) uint8
    row = tl.program_id(0).to(tl.int64)
    base = buf_ptr + row * stride_row
    y = tl.load(y_ptr + row)
    scale = tl.load(scale_ptr + row)
    # The label's logit is read before anything of the row is overwritten: the gradient sweep
    # below writes the row in place, and on a GPU the warps of this program would race a later
    # read of x[y] (the barrier after the first sweep orders this read before every store). A
    # label outside [0, V) reads nothing (the op wrapper never passes one: it checks on the
    # device and makes such rows NaN) and gives a NaN loss.
    y_ok = (y >= 0) & (y < V)
    x_label = tl.load(base + tl.where(y_ok, y, 0)).to(tl.float32)
    x_label = tl.where(y_ok, x_label, float("nan"))
    m = -float("inf")
    s = 0.0
    sz = 0.0
    best = -float("inf")
    best_idx = V
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=-float("inf")).to(tl.float32)
        # first argmax on the raw logits (tanh is monotonic)
        bmax = tl.max(x, 0)
        bidx = tl.min(tl.where(x == bmax, offs, V), 0)
        take = bmax > best
        best_idx = tl.where(take, bidx, best_idx)
        best = tl.maximum(best, bmax)
        z = _capped(x, softcap, CAP)
        zb = tl.max(z, 0)
        m_new = tl.maximum(m, zb)
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(z - m_new), 0.0), 0)
        sz += tl.sum(tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    z_label = _capped(x_label, softcap, CAP)
    zt = z_loss * lse * lse
    loss = lse - (1.0 - smoothing) * z_label - smoothing / V * sz + zt
    tl.store(loss_ptr + row, loss)
    tl.store(z_ptr + row, zt)
    tl.store(correct_ptr + row, (best_idx == y).to(tl.uint8))
    if WRITE_GRAD:
        tl.debug_barrier()  # every read of the row (x[y] included) happens before the first store
        a = scale * (1.0 + 2.0 * z_loss * lse)
        b = scale * smoothing / V
        c = scale * (1.0 - smoothing)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            z = _capped(x, softcap, CAP)
            g = tl.exp(z - lse) * a - b - tl.where(offs == y, c, 0.0)
            if CAP:
                t = z / softcap
                g = g * (1.0 - t * t)
            if MANUAL_BF16_RNE:
                # Interpreter only: its fp32->bf16 cast truncates (triton 3.9 interpreter.py
                # cast_impl), so round to nearest even by hand; on GPUs the cast is already RNE.
                bits = g.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                tl.store(base + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True),
                         mask=mask)
            else:
                tl.store(base + offs, g.to(buf_ptr.dtype.element_ty), mask=mask)


def cross_entropy_chunk_triton(buf: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                               smoothing: float, z_loss: float, softcap: float | None,
                               write_grad: bool):
    """buf: (rows, V) fp32/bf16/fp16 with unit column stride (overwritten by dloss/dlogits when
    ``write_grad``); y: (rows,) int64 in [0, V); scale: (rows,) fp32.
    Returns loss (rows,) fp32 (z-loss included), z-loss term (rows,) fp32, correct (rows,) bool."""
    rows, V = buf.shape
    assert buf.stride(1) == 1 and y.is_contiguous() and scale.is_contiguous()
    loss = torch.empty(rows, dtype=torch.float32, device=buf.device)
    zt = torch.empty_like(loss)
    correct = torch.empty(rows, dtype=torch.uint8, device=buf.device)
    if rows == 0:
        return loss, zt, correct.bool()
    block = min(4096, triton.next_power_of_2(V))
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    _ce_chunk_kernel[(rows,)](buf, buf.stride(0), y, scale, loss, zt, correct, V,
                              float(smoothing), float(z_loss), float(softcap or 1.0),
                              CAP=softcap is not None, WRITE_GRAD=bool(write_grad),
                              MANUAL_BF16_RNE=interpret and buf.dtype == torch.bfloat16,
                              BLOCK_V=block)
    return loss, zt, correct.bool()
