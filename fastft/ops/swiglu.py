"""Fused SwiGLU gate (Shazeer, "GLU Variants Improve Transformer", 2020), the activation of
Llama-family MLPs ``down(silu(gate(x)) * up(x))``::

    y = silu(g) * u = g * sigmoid(g) * u
    du = dy * silu(g);   dg = dy * u * s * (1 + g * (1 - s)),   s = sigmoid(g)

The autograd.Function saves only the two inputs and recomputes sigmoid in backward; eager
PyTorch saves gate, silu(gate) and up (one more activation per MLP) and makes 2 passes forward
and 4 backward. The kernels compute in fp32 and round once per output.

Backends (one choice, :func:`swiglu`): ``cpu`` (csrc/cpu/elementwise.cpp), ``triton``
(kernels/swiglu.py), ``cuda`` (csrc/cuda/elementwise.cu), ``torch`` (:func:`swiglu_reference`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft import _backend

__all__ = ["SwiGLUSaved", "swiglu", "swiglu_bwd", "swiglu_fwd", "swiglu_node_backend", "swiglu_reference"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in fp32 maths, rounded once to the inputs' promoted dtype.

    Args:
        gate, up: same shape (...,), float dtypes.
    Returns:
        Same shape, ``promote_types(gate.dtype, up.dtype)``.
    """
    return (F.silu(gate.float()) * up.float()).to(torch.promote_types(gate.dtype, up.dtype))


class SwiGLUSaved(NamedTuple):
    """What :func:`swiglu_fwd` keeps for :func:`swiglu_bwd`."""

    gate: Tensor  # contiguous
    up: Tensor  # contiguous
    backend: str


@_backend.on_input_device
def swiglu_fwd(gate: Tensor, up: Tensor, backend: str) -> tuple[Tensor, SwiGLUSaved]:
    """The fused forward on one kernel backend, without autograd (for callers building their own
    autograd node, with :func:`swiglu_bwd`; :func:`swiglu` is the differentiable op).

    Args:
        gate, up: same shape (..., intermediate), one dtype in fp32/bf16/fp16, one device.
        backend: ``cpu``, ``triton`` or ``cuda``.
    Returns:
        (y, saved): y shaped like gate (contiguous); saved for :func:`swiglu_bwd` (the inputs).
    """
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    code = _backend.DTYPE_CODES[g.dtype]
    if n:
        if backend == "cpu":
            _backend.cpu_ext().swiglu_fwd(g.data_ptr(), u.data_ptr(), y.data_ptr(), n, code)
        elif backend == "triton":
            from fastft.kernels.swiglu import swiglu_fwd_triton
            swiglu_fwd_triton(g, u, y)
        else:
            _backend.cuda_ext().swiglu_fwd(g.data_ptr(), u.data_ptr(), y.data_ptr(), n, code,
                                           torch.cuda.current_stream(g.device).cuda_stream)
    return y, SwiGLUSaved(g, u, backend)


def swiglu_bwd(saved: SwiGLUSaved, dy: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`swiglu_fwd`.

    Args:
        saved: the forward's second result.
        dy: gradient of y, the inputs' shape (any layout).
    Returns:
        (dgate, dup), each shaped like the inputs, in their dtype.
    """
    g, u = saved.gate, saved.up
    with _backend.device_of(g):
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        code = _backend.DTYPE_CODES[g.dtype]
        if n:
            if saved.backend == "cpu":
                _backend.cpu_ext().swiglu_bwd(g.data_ptr(), u.data_ptr(), dy.data_ptr(), dg.data_ptr(),
                                              du.data_ptr(), n, code)
            elif saved.backend == "triton":
                from fastft.kernels.swiglu import swiglu_bwd_triton
                swiglu_bwd_triton(g, u, dy, dg, du)
            else:
                _backend.cuda_ext().swiglu_bwd(g.data_ptr(), u.data_ptr(), dy.data_ptr(), dg.data_ptr(),
                                               du.data_ptr(), n, code,
                                               torch.cuda.current_stream(g.device).cuda_stream)
    return dg, du


def swiglu_node_backend(y: Tensor) -> str | None:
    """The kernel backend of the fused autograd node that produced ``y``, or None when ``y`` did
    not come from the fused op (the reference path, or no grad)."""
    fn = y.grad_fn
    return fn.backend if type(fn) is _SwiGLUFn._backward_cls else None


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, backend: str) -> Tensor:
        y, s = swiglu_fwd(gate, up, backend)
        ctx.save_for_backward(s.gate, s.up)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        dg, du = swiglu_bwd(SwiGLUSaved(*ctx.saved_tensors, ctx.backend), dy)
        return dg, du, None


def swiglu(gate: Tensor, up: Tensor, forced: str | None = None) -> Tensor:
    """Fused ``silu(gate) * up`` (see the module docstring).

    Args:
        gate, up: same shape (..., intermediate), same device. The kernels need one dtype in
            fp32/bf16/fp16 (mixed dtypes run the reference).
        forced: backend name overriding ``FASTFT_BACKEND``.
    Returns:
        Same shape and dtype as the inputs; differentiable in both.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate has shape {tuple(gate.shape)}, up {tuple(up.shape)}: expected equal shapes")
    if gate.device != up.device:
        raise ValueError(f"swiglu: gate on {gate.device}, up on {up.device}: expected one device")
    backend = _backend.choose_backend("swiglu", gate.device, forced)
    if backend == "torch" or gate.dtype != up.dtype or gate.dtype not in _KERNEL_DTYPES:
        return swiglu_reference(gate, up)
    return _SwiGLUFn.apply(gate, up, backend)
