"""Fused rotary position embedding (Su et al., "RoFormer", 2021) for q and k, the maths of
transformers' Llama ``apply_rotary_pos_emb``::

    y = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

and its backward, the transposed rotation (exact for any cos/sin, duplicated halves or not)::

    dx[:D/2] = dy[:D/2] * cos[:D/2] + dy[D/2:] * sin[D/2:]
    dx[D/2:] = dy[D/2:] * cos[D/2:] - dy[:D/2] * sin[:D/2]

Eager PyTorch makes 8 temporaries per tensor (two slices, neg, cat, two muls, add; same again
backward); the kernels read x and cos/sin once and write y once, in fp32 maths, for q and k
in the (B, H, T, D) strided views HF passes (the output keeps q's memory layout, as eager does).

Backends (one choice, :func:`rope`): ``cpu`` (csrc/cpu/elementwise.cpp), ``triton``
(kernels/rope.py), ``cuda`` (csrc/cuda/elementwise.cu), ``torch`` (:func:`rope_reference`).
The kernels need q, k, cos, sin of one dtype (fp32/bf16/fp16), an even head dim equal to
cos's last dim, and cos/sin without grad; anything else runs the reference.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastft import _backend

__all__ = ["RoPESaved", "rope", "rope_bwd", "rope_fwd", "rope_kernel_ok", "rope_reference"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """``x * cos + rotate_half(x) * sin`` for q and k in fp32 maths, rounded once.

    Args:
        q: (B, Hq, T, D) for ``unsqueeze_dim=1`` ((B, T, Hq, D) for 2); k: same with Hk heads.
        cos, sin: (B or 1, T, D).
    Returns:
        (q_embed, k_embed) shaped like q and k, in ``promote_types(x.dtype, cos.dtype)``.
    """
    c = cos.unsqueeze(unsqueeze_dim).float()
    s = sin.unsqueeze(unsqueeze_dim).float()
    out = []
    for x in (q, k):
        xf = x.float()
        out.append((xf * c + _rotate_half(xf) * s).to(torch.promote_types(x.dtype, cos.dtype)))
    return out[0], out[1]


def rope_kernel_ok(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> bool:
    """Whether the fused kernels take these inputs (:func:`rope_fwd` needs it; otherwise
    :func:`rope` runs the reference). Shapes as in :func:`rope`."""
    dt = q.dtype
    if dt not in _KERNEL_DTYPES or any(t.dtype != dt for t in (k, cos, sin)):
        return False
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    if cos.shape != sin.shape or cos.requires_grad or sin.requires_grad:
        return False
    bq, tq = (q.shape[0], q.shape[2]) if unsqueeze_dim == 1 else (q.shape[0], q.shape[1])
    bk, tk = (k.shape[0], k.shape[2]) if unsqueeze_dim == 1 else (k.shape[0], k.shape[1])
    d = q.shape[-1]
    return (d % 2 == 0 and k.shape[-1] == d and cos.shape[-1] == d and bq == bk and tq == tk
            and cos.shape[1] == tq and cos.shape[0] in (1, bq))


def _bhtd(x: Tensor, unsqueeze_dim: int) -> Tensor:
    """A (B, H, T, D) view with unit stride in D (copying only when D is strided)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x if unsqueeze_dim == 1 else x.transpose(1, 2)


@_backend.on_input_device
def _apply(x: Tensor, cs: tuple[Tensor, Tensor], backend: str, backward: bool, unsqueeze_dim: int) -> Tensor:
    """Rotate x (layout of the caller, see ``_bhtd``) into a new tensor with x's layout."""
    xv = _bhtd(x, unsqueeze_dim)
    y = torch.empty_like(xv)  # dense input: same strides, so SDPA sees eager's layout
    cos, sin = cs
    B, H, T, D = xv.shape
    if xv.numel():
        cstr = (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1))
        if backend == "cpu":
            _backend.cpu_ext().rope(xv.data_ptr(), y.data_ptr(), cos.data_ptr(), sin.data_ptr(), [B, H, T, D],
                                    list(xv.stride()[:3]), list(y.stride()[:3]), list(cstr), backward,
                                    _backend.DTYPE_CODES[x.dtype])
        elif backend == "triton":
            from fastft.kernels.rope import rope_triton
            rope_triton(xv, y, cos, sin, cstr, backward)
        else:
            _backend.cuda_ext().rope(xv.data_ptr(), y.data_ptr(), cos.data_ptr(), sin.data_ptr(), [B, H, T, D],
                                     list(xv.stride()[:3]), list(y.stride()[:3]), list(cstr), backward,
                                     _backend.DTYPE_CODES[x.dtype], torch.cuda.current_stream(x.device).cuda_stream)
    return y if unsqueeze_dim == 1 else y.transpose(1, 2)


def _cos_sin(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # the kernels index cos and sin with one pair of strides and need unit stride in D
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


class RoPESaved(NamedTuple):
    """What :func:`rope_fwd` keeps for :func:`rope_bwd`."""

    cos: Tensor  # (B or 1, T, D), unit stride in D, strides shared with sin
    sin: Tensor
    backend: str
    unsqueeze_dim: int


def rope_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int,
             backend: str) -> tuple[Tensor, Tensor, RoPESaved]:
    """The fused rotation of q and k on one kernel backend, without autograd (for callers building
    their own autograd node, with :func:`rope_bwd`; :func:`rope` is the differentiable op).

    Args:
        q, k, cos, sin, unsqueeze_dim: as in :func:`rope`, accepted by :func:`rope_kernel_ok`.
        backend: ``cpu``, ``triton`` or ``cuda``.
    Returns:
        (q_embed, k_embed, saved): q_embed and k_embed with q's and k's shapes and memory layouts.
    """
    cs = _cos_sin(cos, sin)
    saved = RoPESaved(cs[0], cs[1], backend, unsqueeze_dim)
    return _apply(q, cs, backend, False, unsqueeze_dim), _apply(k, cs, backend, False, unsqueeze_dim), saved


def rope_bwd(saved: RoPESaved, dq: Tensor | None, dk: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`rope_fwd` (the transposed rotation): (dq, dk) shaped like q and k, None
    where the incoming gradient is None."""
    cs = (saved.cos, saved.sin)
    gq = None if dq is None else _apply(dq, cs, saved.backend, True, saved.unsqueeze_dim)
    gk = None if dk is None else _apply(dk, cs, saved.backend, True, saved.unsqueeze_dim)
    return gq, gk


class _RoPEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int, backend: str):
        qe, ke, s = rope_fwd(q, k, cos, sin, unsqueeze_dim, backend)
        ctx.save_for_backward(s.cos, s.sin)
        ctx.backend, ctx.unsqueeze_dim = backend, unsqueeze_dim
        return qe, ke

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None):
        gq, gk = rope_bwd(RoPESaved(*ctx.saved_tensors, ctx.backend, ctx.unsqueeze_dim), dq, dk)
        return gq, gk, None, None, None, None


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1,
         forced: str | None = None) -> tuple[Tensor, Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``.

    Args:
        q: (B, Hq, T, D) (``unsqueeze_dim=1``, HF's layout, any strides) or (B, T, Hq, D) (2).
        k: like q with Hk heads.
        cos, sin: (B or 1, T, D), the rotary table HF's ``rotary_emb`` returns.
        forced: backend name overriding ``FASTFT_BACKEND``.
    Returns:
        (q_embed, k_embed): shapes and memory layouts of q and k; differentiable in q and k.
    """
    backend = _backend.choose_backend("rope", q.device, forced)
    if backend == "torch" or not rope_kernel_ok(q, k, cos, sin, unsqueeze_dim):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    return _RoPEFn.apply(q, k, cos, sin, unsqueeze_dim, backend)
