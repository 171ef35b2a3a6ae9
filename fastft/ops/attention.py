"""Causal self-attention with grouped-query heads, forward and backward, no T x T tensor saved::

    s_ij = scale * q_i . k_j (j <= i);  p = softmax_j(s);  o_i = sum_j p_ij v_j

with ``q`` (B, Hq, T, D) and ``k``/``v`` (B, Hkv, T, D), query head h reading kv head
``h // (Hq // Hkv)`` (GQA without materialising repeated k/v). The forward saves the fp32
log-sum-exp per row; the backward recomputes the probabilities from it (flash-attention style)::

    delta_i = do_i . o_i;  ds_ij = scale * p_ij (do_i . v_j - delta_i)
    dq = ds k;  dk = ds^T q;  dv = p^T do      (summed over the query heads of a kv head)

Why: torch's CPU SDPA flash kernel runs these shapes at about a quarter of the CPU's GEMM rate
(22 ms forward+backward per SmolLM2 layer, 28% of a LoRA step); see csrc/cpu/attention.cpp.

Precision: fp32 sums throughout. With bf16 inputs on a CPU with AVX512-BF16 the CPU kernel rounds
p and ds to bf16 before the products that take them (p v, ds k, p^T do, ds^T q), as SDPA's bf16
CPU kernel does for p v; its error stays within 2x SDPA's (tests/test_attention.py) and it runs
1.6x faster than fp32 tiles (benchmarks/results/attention.md). ``fastft._C.attention_bf16_dot(False)``
switches that path off (fp32 tiles, p and ds kept in fp32).

Layouts: inputs may be any strided view with a contiguous last dim (HF's ``view().transpose(1,2)``
of the projections is read in place). The output is returned as a (B, Hq, T, D) view of a
(B, T, Hq, D)-contiguous tensor, so HF's ``transpose(1, 2).reshape(B, T, -1)`` before ``o_proj``
is free and o_proj saves the very tensor attention saved. Gradients come back in the same
(B, T, H, D) layout as the projections produced them.

Backends (one choice, :func:`causal_attention`): ``cpu`` (csrc/cpu/attention.cpp), ``triton``
(kernels/attention.py), ``cuda`` (csrc/cuda/attention.cu); the ``torch`` fallback is PyTorch's
own fused ``scaled_dot_product_attention`` (a T x T reference would be slow and memory-hungry
as a fallback), also used for dtypes other than fp32/bf16/fp16 and, on the GPU backends, for
head dims above 256. :func:`attention_reference` (fp32 maths, materialised scores) is the test oracle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft import _backend

__all__ = ["attention_reference", "causal_attention"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest head dim of the GPU kernels (kernels/attention.py MAX_HEAD_DIM, csrc/cuda/attention.cu
# kMaxHeadDim: their tiles keep (tile, D) fp32 accumulators in registers); larger ones run SDPA.
_GPU_MAX_HEAD_DIM = 256


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """Causal GQA attention in fp32 maths with materialised scores: the test oracle.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0; one float dtype.
        scale: score multiplier (default 1/sqrt(D)).
    Returns:
        (B, Hq, T, D) in q's dtype; differentiable in q, k, v.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    p = s.masked_fill(mask, float("-inf")).softmax(-1)
    return (p @ vf).to(q.dtype)


def _strides(t: Tensor) -> list[int]:
    return [t.stride(0), t.stride(1), t.stride(2)]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bthd(b: int, t: int, h: int, d: int, like: Tensor) -> Tensor:
    """A (B, H, T, D) view of a fresh (B, T, H, D)-contiguous tensor."""
    return torch.empty(b, t, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    @_backend.on_input_device
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tensor:
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        out = _bthd(b, t, hq, d, q)
        lse = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
        if backend == "cpu":
            _backend.cpu_ext().attention_fwd(q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                                             _strides(v), out.data_ptr(), _strides(out), lse.data_ptr(),
                                             b, hq, hkv, t, d, float(scale), _backend.DTYPE_CODES[q.dtype])
        elif backend == "triton":
            from fastft.kernels.attention import attention_fwd_triton
            attention_fwd_triton(q, k, v, out, lse, float(scale))
        else:
            _backend.cuda_ext().attention_fwd(q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                                              _strides(v), out.data_ptr(), _strides(out), lse.data_ptr(),
                                              b, hq, hkv, t, d, float(scale), _backend.DTYPE_CODES[q.dtype],
                                              torch.cuda.current_stream(q.device).cuda_stream)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backend = scale, backend
        return out

    @staticmethod
    @_backend.on_input_device
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dout = _last_dim_contiguous(dout)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        dq, dk, dv = _bthd(b, t, hq, d, q), _bthd(b, t, hkv, d, k), _bthd(b, t, hkv, d, v)
        args = (q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
                out.data_ptr(), _strides(out), dout.data_ptr(), _strides(dout), lse.data_ptr(),
                dq.data_ptr(), _strides(dq), dk.data_ptr(), _strides(dk), dv.data_ptr(), _strides(dv),
                b, hq, hkv, t, d, float(ctx.scale), _backend.DTYPE_CODES[q.dtype])
        if ctx.backend == "cpu":
            _backend.cpu_ext().attention_bwd(*args)
        elif ctx.backend == "triton":
            from fastft.kernels.attention import attention_bwd_triton
            attention_bwd_triton(q, k, v, out, dout, lse, dq, dk, dv, float(ctx.scale))
        else:
            _backend.cuda_ext().attention_bwd(*args, torch.cuda.current_stream(q.device).cuda_stream)
        return dq, dk, dv, None, None


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "expected 4-D (B, H, T, D) tensors")
    b, hq, t, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (t, d):
        raise ValueError(f"causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"k and v of shape ({b}, Hkv, {t}, {d})")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"causal_attention: {hq} query heads, {k.shape[1]} kv heads: expected a multiple")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"causal_attention: dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: expected one float dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"causal_attention: devices q {q.device}, k {k.device}, v {v.device}: expected one")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                     forced: str | None = None) -> Tensor:
    """Causal self-attention (see the module docstring for the maths and layouts).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D), Hq % Hkv == 0; fp32/bf16/fp16, one device, any
            strides (a non-contiguous last dim is copied).
        scale: score multiplier (default 1/sqrt(D)).
        forced: backend name overriding ``FASTFT_BACKEND``.
    Returns:
        (B, Hq, T, D) in q's dtype (a view of a (B, T, Hq, D)-contiguous tensor on the kernel
        backends); differentiable in q, k, v.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _backend.choose_backend("attention", q.device, forced)
    if (backend == "torch" or q.dtype not in _KERNEL_DTYPES
            or (backend in ("triton", "cuda") and q.shape[-1] > _GPU_MAX_HEAD_DIM)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return _AttentionFn.apply(q, k, v, scale, backend)
