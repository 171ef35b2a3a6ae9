"""Fused RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019), the way
Hugging Face's ``LlamaRMSNorm`` computes it::

    r = 1 / sqrt(mean(x^2, -1) + eps)        (fp32)
    y = weight * (x * r).to(x.dtype)          (the normalised row is rounded to x's dtype first)

Backward (fp32 maths, ``n = x * r``)::

    dx = r * (dy*w - n * mean(dy*w * n, -1));   dweight = sum over rows of dy * n.to(x.dtype)

Eager PyTorch makes ~6 passes over the activations (cast, pow, mean, rsqrt-mul, cast,
weight-mul) and saves several of them for backward; the kernels read x once, write y once and
save only x and the per-row fp32 ``r``.

Backends (one choice, :func:`rms_norm`): ``cpu`` (csrc/cpu/elementwise.cpp), ``triton``
(kernels/rms_norm.py), ``cuda`` (csrc/cuda/elementwise.cu), ``torch``
(:func:`rms_norm_reference`). The kernels take ``weight.dtype == x.dtype`` in fp32/bf16/fp16,
or an fp32 weight with bf16/fp16 x (fastft keeps trainable norm weights in fp32,
fastft/train/precision.py): then ``y = round_x(weight * round_x(x * r))`` is returned in x's dtype
(HF's module would promote to fp32, and autocast's next matmul round it to x's dtype: the same
values) and dweight is fp32. The CUDA kernels are not built for that mix: on CUDA it runs the
reference. Other combinations run the reference (``promote_types`` result, HF's).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastft import _backend

__all__ = ["RMSNormSaved", "rms_norm", "rms_norm_bwd", "rms_norm_fwd", "rms_norm_kernel_ok",
           "rms_norm_node_backend", "rms_norm_reference"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm in fp32 maths: the fallback and the test oracle.

    Args:
        x: (..., n) fp32/bf16/fp16.
        weight: (n,) any float dtype.
        eps: added to the mean square.
    Returns:
        (..., n) in ``promote_types(x.dtype, weight.dtype)`` (HF's result dtype).

    The forward rounds ``x * r`` to x's dtype as HF does; the gradient passes straight through
    that rounding in fp32 (no bf16 rounding of intermediate gradients).
    """
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if x.dtype != torch.float32:
        n = n + (n.to(x.dtype).float() - n).detach()  # forward: HF's rounding; backward: identity
    return (weight.float() * n).to(torch.promote_types(x.dtype, weight.dtype))


def _check(x: Tensor, weight: Tensor) -> None:
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1] if x.dim() else '?'},)"
                         f" matching the last dim of x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight on {weight.device}, x on {x.device}: expected one device")


def _fp32_weight(x: Tensor, weight: Tensor) -> bool:
    return weight.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)


def rms_norm_kernel_ok(x: Tensor, weight: Tensor, backend: str) -> bool:
    """Whether the fused kernels of ``backend`` take this x/weight dtype pair (:func:`rms_norm_fwd`
    needs it; otherwise :func:`rms_norm` runs the reference).

    Args:
        x: (..., n) activations; weight: (n,).
        backend: a kernel backend name (``cpu``, ``triton``, ``cuda``).
    """
    if x.dtype not in _KERNEL_DTYPES:
        return False
    return weight.dtype == x.dtype or (_fp32_weight(x, weight) and backend != "cuda")


class RMSNormSaved(NamedTuple):
    """What :func:`rms_norm_fwd` keeps for :func:`rms_norm_bwd`: the tensors (``x2``, ``w``,
    ``rstd``) and the call's backend and input shape."""

    x2: Tensor  # (rows, n) contiguous input
    w: Tensor  # (n,) contiguous weight
    rstd: Tensor  # (rows,) fp32 1 / sqrt(mean(x^2) + eps)
    backend: str
    shape: torch.Size  # x's shape


@_backend.on_input_device
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, backend: str) -> tuple[Tensor, RMSNormSaved]:
    """The fused forward on one kernel backend, without autograd (callers that build their own
    autograd node use it with :func:`rms_norm_bwd`; :func:`rms_norm` is the differentiable op).

    Args:
        x: (..., n), a dtype :func:`rms_norm_kernel_ok` accepts for ``weight`` and ``backend``.
        weight: (n,) on x's device.
        eps: added to the mean square.
        backend: ``cpu``, ``triton`` or ``cuda``.
    Returns:
        (y, saved): y (..., n) in x's dtype; saved for :func:`rms_norm_bwd`.
    """
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    w = weight.contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        if backend == "cpu":
            _backend.cpu_ext().rms_norm_fwd(x2.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                                            rows, n, float(eps), _backend.DTYPE_CODES[x.dtype],
                                            _backend.DTYPE_CODES[w.dtype])
        elif backend == "triton":
            from fastft.kernels.rms_norm import rms_norm_fwd_triton
            rms_norm_fwd_triton(x2, w, y, rstd, float(eps))
        else:
            _backend.cuda_ext().rms_norm_fwd(x2.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(),
                                             rows, n, float(eps), _backend.DTYPE_CODES[x.dtype],
                                             torch.cuda.current_stream(x.device).cuda_stream)
    return y.view(shape), RMSNormSaved(x2, w, rstd, backend, shape)


def rms_norm_bwd(saved: RMSNormSaved, dy: Tensor, need_weight: bool = True) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`rms_norm_fwd`.

    Args:
        saved: the forward's second result.
        dy: (..., n) gradient of y (any layout).
    Returns:
        (dx, dweight): dx shaped like the forward's x in its dtype; dweight (n,) in the weight's
        dtype, or None when ``need_weight`` is False.
    """
    with _backend.device_of(saved.x2):
        x2, w, rstd = saved.x2, saved.w, saved.rstd
        rows, n = x2.shape
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        dw = torch.empty(n, dtype=torch.float32, device=x2.device)
        code = _backend.DTYPE_CODES[x2.dtype]
        if saved.backend == "cpu":
            _backend.cpu_ext().rms_norm_bwd(dy2.data_ptr(), x2.data_ptr(), w.data_ptr(), rstd.data_ptr(),
                                            dx.data_ptr(), dw.data_ptr(), rows, n, code,
                                            _backend.DTYPE_CODES[w.dtype])
        elif rows == 0:
            dw.zero_()
        elif saved.backend == "triton":
            from fastft.kernels.rms_norm import rms_norm_bwd_triton
            rms_norm_bwd_triton(dy2, x2, w, rstd, dx, dw)
        else:
            _cuda_bwd(dy2, x2, w, rstd, dx, dw)
    return dx.view(saved.shape), (dw.to(w.dtype) if need_weight else None)


def rms_norm_node_backend(y: Tensor) -> str | None:
    """The kernel backend of the fused autograd node that produced ``y``, or None when ``y`` did
    not come from the fused op (the reference path, or no grad)."""
    fn = y.grad_fn
    return fn.backend if type(fn) is _RMSNormFn._backward_cls else None


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, backend: str) -> Tensor:
        y, s = rms_norm_fwd(x, weight, eps, backend)
        ctx.save_for_backward(s.x2, s.w, s.rstd)
        ctx.backend, ctx.shape = s.backend, s.shape
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        saved = RMSNormSaved(*ctx.saved_tensors, ctx.backend, ctx.shape)
        dx, dweight = rms_norm_bwd(saved, dy, ctx.needs_input_grad[1])
        return dx, dweight, None, None


def _cuda_bwd(dy2, x2, w, rstd, dx, dw) -> None:
    ext = _backend.cuda_ext()
    rows, n = x2.shape
    nblocks = ext.rms_norm_bwd_blocks(rows)
    partial = torch.empty(nblocks, n, dtype=torch.float32, device=x2.device)
    ext.rms_norm_bwd(dy2.data_ptr(), x2.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                     partial.data_ptr(), rows, n, _backend.DTYPE_CODES[x2.dtype],
                     torch.cuda.current_stream(x2.device).cuda_stream)
    torch.sum(partial, 0, out=dw)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, forced: str | None = None) -> Tensor:
    """Fused RMSNorm over the last dim (see the module docstring for the maths).

    Args:
        x: (..., n) fp32/bf16/fp16, any layout (made contiguous).
        weight: (n,) on x's device; the kernels take x's dtype, or fp32 with bf16/fp16 x.
        eps: added to the mean square (HF's ``variance_epsilon``).
        forced: backend name overriding ``FASTFT_BACKEND``.
    Returns:
        (..., n) in x's dtype when weight is x's dtype or fp32 with 16-bit x, else
        ``promote_types(x.dtype, weight.dtype)``; differentiable in x and weight (dweight in
        weight's dtype).
    """
    _check(x, weight)
    backend = _backend.choose_backend("rms_norm", x.device, forced)
    if backend == "torch" or not rms_norm_kernel_ok(x, weight, backend):
        y = rms_norm_reference(x, weight, eps)
        return y.to(x.dtype) if _fp32_weight(x, weight) else y
    return _RMSNormFn.apply(x, weight, eps, backend)
