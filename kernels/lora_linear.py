"""Triton kernel of the LoRA linear on an int8 (or float) frozen base (fastft.kernels.lora_linear).

One GEMM kernel serves the forward and dX:

    C[M, N] = A[M, K] @ deq(Bop)[K, N]  (+ bias[N])  + U[M, K2] @ V[K2, N]

* forward: A = x, Bop = Wᵀ (int8 read through strides), scale per N (output channel),
  U = [x[:, outlier cols], s · x Aᵀ], V = [W_outliers, B]ᵀ (the LoRA term and the 16-bit outlier
  columns are one low-rank product in the epilogue);
* dX: A = dY, Bop = W, scale per K (the reduction runs over output channels), U = s · dY B, V = A.

The int8 → float conversion happens in the main loop as each (BK, BN) tile is loaded: no
dequantised copy of W exists. A per-N scale is applied once to the accumulator after the loop
(int8 values are exact in bf16/fp16, so this rounds less than scaling every element); a per-K
scale must be applied in the loop.

Under ``TRITON_INTERPRET=1`` ``tl.dot`` on bf16 operands is broken (it multiplies raw bit
patterns, triton-lang/triton#11584): the launcher sets ``UPCAST`` only when interpreting, which
runs every dot on fp32 operands. On a GPU fp32 dots use ``input_precision="ieee"`` (torch's
default fp32 matmul does not use TF32 either).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_mm_kernel(a_ptr, b_ptr, s_ptr, u_ptr, v_ptr, bias_ptr, c_ptr, M, N, K, K2,
                    stride_am, stride_bk, stride_bn, stride_um, stride_vk, stride_vn, stride_cm,
                    IS_INT8: tl.constexpr, SCALE_ON_K: tl.constexpr, HAS_LR: tl.constexpr,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr):
    # a: (M, K) row-major (stride_am, 1); b: element (k, n) at k*stride_bk + n*stride_bn (int8 or
    # float); s: (N,) or (K,) fp32/bf16 scales; u: (M, K2) (stride_um, 1); v: (k2, n) at
    # k2*stride_vk + n*stride_vn; bias: (N,); c: (M, N) (stride_cm, 1)
    # int64 row/column indices: rm * stride_am (M * K elements) passes 2^31 on big activations
    # (16 x 8192 tokens x 28672 = 3.8e9); tests/test_int64_offsets.py
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        if IS_INT8:
            bf = b.to(tl.float32)
            if SCALE_ON_K:
                bf = bf * tl.load(s_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)[:, None]
        else:
            bf = b.to(tl.float32)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), bf)
        elif IEEE:
            acc += tl.dot(a, bf, input_precision="ieee")
        else:
            acc += tl.dot(a, bf.to(a.dtype))
    if IS_INT8:
        if not SCALE_ON_K:
            acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LR:  # epilogue: the LoRA (+ outlier) low-rank product, BK2 columns of it at a time
        for j0 in range(0, K2, BK2):
            r2 = j0 + tl.arange(0, BK2).to(tl.int64)
            u = tl.load(u_ptr + rm[:, None] * stride_um + r2[None, :],
                        mask=(rm[:, None] < M) & (r2[None, :] < K2), other=0.0)
            v = tl.load(v_ptr + r2[:, None] * stride_vk + rn[None, :] * stride_vn,
                        mask=(r2[:, None] < K2) & (rn[None, :] < N), other=0.0)
            if UPCAST:
                acc += tl.dot(u.to(tl.float32), v.to(tl.float32))
            elif IEEE:
                acc += tl.dot(u, v, input_precision="ieee")
            else:
                acc += tl.dot(u, v.to(u.dtype))
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def lora_mm(a: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int], n: int, scale: torch.Tensor | None,
            scale_on_k: bool, u: torch.Tensor | None, v: torch.Tensor | None, v_strides: tuple[int, int],
            bias: torch.Tensor | None, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """C = a @ deq(b) (+ bias) + u @ v as described in the module docstring.

    Args:
        a: (M, K) contiguous fp32/bf16/fp16. b: int8 or a's dtype, element (k, n) at
            ``k*b_strides[0] + n*b_strides[1]``. n: N. scale: (N,) or (K,) when b is int8.
        u: (M, K2) contiguous in a's dtype or None; v: element (k2, n) at ``k2*v_strides[0] +
            n*v_strides[1]``. bias: (N,) or None.
        tiles: (BM, BN, BK); default the GPU's (64, 128, 32), or 32^3 under the interpreter (fewer
            numpy calls). Tests pass the GPU tiles to the interpreter to reach their edge cases.
    Returns:
        (M, N) in a's dtype.
    """
    M, K = a.shape
    c = torch.empty(M, n, dtype=a.dtype, device=a.device)
    if M == 0 or n == 0:
        return c
    k2 = 0 if u is None else u.shape[1]
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    BM, BN, BK = tiles or ((32, 32, 32) if interp else (64, 128, 32))
    BK2 = min(64, max(16, triton.next_power_of_2(max(k2, 1))))
    dummy = a
    grid = (triton.cdiv(M, BM), triton.cdiv(n, BN))
    _lora_mm_kernel[grid](
        a, b, scale if scale is not None else dummy, u if u is not None else dummy,
        v if v is not None else dummy, bias if bias is not None else dummy, c,
        M, n, K, k2, a.stride(0), b_strides[0], b_strides[1], u.stride(0) if u is not None else 0,
        v_strides[0], v_strides[1], c.stride(0),
        IS_INT8=b.dtype == torch.int8, SCALE_ON_K=scale_on_k, HAS_LR=u is not None and k2 > 0,
        HAS_BIAS=bias is not None, UPCAST=interp, IEEE=a.dtype == torch.float32,
        BM=BM, BN=BN, BK=BK, BK2=BK2)
    return c
