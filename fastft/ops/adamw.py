"""Fused AdamW with fused global-norm gradient clipping: reference, functional step, backend choice.

Maths (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), exactly as
``torch.optim.AdamW`` computes it, with an optional clip of the gradients to a global L2 norm
(``torch.nn.utils.clip_grad_norm_``) folded into the read of each gradient::

    norm = ||concat(g_i)||_2 / grad_scale;  c = min(max_norm / (norm + 1e-6), 1) / grad_scale
    t += 1;  g = c * g  (-g when maximize);  p *= 1 - lr * wd
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g^2;  vmax = max(vmax, v)  (amsgrad)
    p -= lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)

A non-finite ``norm`` or a non-zero ``found_inf`` skips the whole step: no parameter, moment or
step counter changes. Moments are fp32 for every parameter dtype; bf16/fp16 parameters either
carry an fp32 master copy (updated, then rounded into the parameter) or are updated in fp32 and
rounded straight back.

"Split" masters (bf16 parameters only): the bf16 parameter is the high half of its fp32 master and
an int16 tensor holds the low half (:func:`split_master_encode`), 2 bytes/param instead of 4. The
master is still exactly fp32 and every step's maths is bit-identical to the fp32-master path; the
bf16 parameter differs from that path's round-to-nearest-even only when the master's low half is
exactly 0x8000 (a tie, rounded away from zero here; probability 2^-16 per element and step).

Backends (one choice, :func:`fused_adamw`): ``cpu`` (csrc/cpu/adamw.cpp, one C++ call for all
parameters), ``triton`` (kernels/adamw.py), ``cuda`` (csrc/cuda/adamw.cu, multi-tensor launch),
``torch`` (:func:`adamw_reference`, ``torch._foreach_*``: the fallback and the test oracle).
The GPU backends never synchronise with the host: the norm, the skip flag, the clip coefficient
and the bias corrections stay on the device.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor

from fastft import _backend
from fastft.errors import UserError

__all__ = ["AdamWGroup", "StepResult", "adamw_reference", "clip_grad_norm_", "fused_adamw",
           "grad_norm", "grad_sumsq", "group_state_ptrs", "kernel_dtype_ok", "split_master_decode",
           "split_master_encode"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class AdamWGroup:
    """The tensors and hyperparameters of one parameter group, for parameters that have grads.

    Every list has one entry per parameter (all on one device). ``params[i]``: any shape, fp32,
    bf16 or fp16, contiguous. ``grads[i]``: same shape, the param dtype or fp32, contiguous.
    ``exp_avgs``/``exp_avg_sqs``/``max_exp_avg_sqs``: same shape, fp32 (``max_exp_avg_sqs`` is
    empty unless amsgrad). ``masters[i]``: None (fp32 params, or no master weights), an fp32
    master of the same shape, or for a bf16 param an int16 tensor of the same shape holding the
    low half of a split master (module docstring). ``steps[i]``: 0-dim fp32 counter on the
    param's device, incremented by the step.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    masters: list[Tensor | None]
    steps: list[Tensor]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool = False
    maximize: bool = False
    # cached raw pointers of the state tensors (CPU backend), set by fastft.optim.FusedAdamW
    state_ptrs: tuple | None = field(default=None, repr=False)


@dataclass
class StepResult:
    """``norm``: 0-dim fp32 pre-clip global L2 norm of the unscaled grads (None without clipping).
    ``skipped``: 0-dim bool tensor, True when the step was skipped (non-finite norm / found_inf)."""

    norm: Tensor | None
    skipped: Tensor


def kernel_dtype_ok(t: Tensor) -> bool:
    return t.dtype in _KERNEL_DTYPES


# ----------------------------------------------------------------------------------------------
# Split masters: bf16 param = high half of the fp32 master, int16 = low half
# ----------------------------------------------------------------------------------------------
# the two 16-bit halves of an fp32 in memory, as seen through .view(torch.int16)
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)


def split_master_encode(master: Tensor) -> tuple[Tensor, Tensor]:
    """Split fp32 masters (any shape) into (bf16 high half, int16 low half), both of its shape.

    With ``b`` the uint32 bit pattern: ``hi = (b + 0x8000) >> 16`` (round half away from zero on
    the magnitude: torch's round-to-nearest-even except at exact ties) and ``lo = int16(b - (hi
    << 16))``, which is the low 16 bits of ``b`` read as signed. Exact for every bit pattern (see
    :func:`split_master_decode`); a NaN's ``hi`` is inf when its mantissa is below 0x8000 and
    +-0 (wrap-around) when it is 0x7F8000 or more (non-finite masters never occur in training:
    a non-finite grad norm skips the step).

    Computed on the int16 halves of the fp32 words (``hi`` = top half + 1 when the low half read
    as signed is negative, int16 wrap-around being the uint32 carry): 5 bytes of temporaries per
    element. The int64 version of these formulas took ~64: the first step of the fastft side of
    ``fastft bench --mode full`` (SmolLM2-135M) then peaked at 3690-3768 MB RSS, with this one at
    2905-2926 MB (when the masters were still split at the first step).
    """
    if master.dtype != torch.float32:
        raise TypeError(f"split_master_encode: master has dtype {master.dtype}, expected torch.float32")
    halves = master.detach().contiguous().reshape(-1).view(torch.int16).view(-1, 2)  # (n, 2)
    lo = halves[:, _LO].clone()
    hi = halves[:, _HI] + (lo < 0).to(torch.int16)
    return hi.view(torch.bfloat16).view(master.shape), lo.view(master.shape)


def split_master_decode(param: Tensor, lo: Tensor) -> Tensor:
    """The fp32 master of a bf16 ``param`` and its int16 low half ``lo`` (same shape): a new
    tensor with bit pattern ``(uint32(hi) << 16) + int32(lo)`` (mod 2^32)."""
    if param.dtype != torch.bfloat16 or lo.dtype != torch.int16 or param.shape != lo.shape:
        raise TypeError(f"split_master_decode: expected a bf16 param and an int16 low half of one shape, "
                        f"got {param.dtype} {tuple(param.shape)} and {lo.dtype} {tuple(lo.shape)}")
    lo = lo.reshape(-1)
    out = torch.empty((lo.numel(), 2), dtype=torch.int16, device=lo.device)
    out[:, _LO] = lo
    # a negative low half borrowed one from the top half: int16 wrap-around = uint32 borrow
    out[:, _HI] = param.detach().reshape(-1).view(torch.int16) - (lo < 0).to(torch.int16)
    return out.view(torch.float32).view(param.shape)


def _is_split(m: Tensor | None) -> bool:
    return m is not None and m.dtype == torch.int16


def _check_master(p: Tensor, m: Tensor | None, where: str) -> None:
    """A master must be fp32 (any low-precision param) or int16 (split, bf16 params only), of the
    param's shape, contiguous and on its device: the kernels index it like the param."""
    if m is None:
        return
    if m.dtype == torch.int16 and p.dtype != torch.bfloat16:
        raise UserError(f"adamw: {where}: a split (int16) master needs a bf16 param, got {p.dtype}")
    if m.dtype not in (torch.float32, torch.int16) or m.shape != p.shape or m.device != p.device \
            or not m.is_contiguous():
        raise UserError(f"adamw: {where}: master is {m.dtype} {tuple(m.shape)} on {m.device} "
                        f"(contiguous={m.is_contiguous()}); expected a contiguous fp32 (or int16 "
                        f"split low half) tensor of shape {tuple(p.shape)} on {p.device}")


# ----------------------------------------------------------------------------------------------
# Reference (pure PyTorch, fp32 maths)
# ----------------------------------------------------------------------------------------------
def adamw_reference(g: AdamWGroup, grad_mult: float | Tensor = 1.0) -> None:
    """One AdamW step on a group with ``torch._foreach_*`` ops in torch.optim.AdamW's order.

    ``grad_mult`` (float or 0-dim fp32 tensor) multiplies every gradient as it is read
    (clip coefficient / grad scale); gradients themselves are not modified.
    """
    if not g.params:
        return
    for i, (p, m) in enumerate(zip(g.params, g.masters)):
        _check_master(p, m, f"param {i}")
    work = [p if m is None else split_master_decode(p, m) if _is_split(m) else m
            for p, m in zip(g.params, g.masters)]
    low = [i for i, w in enumerate(work) if w.dtype != torch.float32]
    if low:  # low-precision params without a master: update an fp32 copy, round back below
        work = [w.float() if w.dtype != torch.float32 else w for w in work]
    grads = [x if x.dtype == torch.float32 else x.float() for x in g.grads]
    if not (isinstance(grad_mult, float) and grad_mult == 1.0):
        grads = torch._foreach_mul(grads, grad_mult)
    if g.maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(g.steps, 1.0)
    steps = [s.item() for s in g.steps]
    lr = float(g.lr)
    if g.weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * g.weight_decay)
    torch._foreach_lerp_(g.exp_avgs, grads, 1 - g.beta1)
    torch._foreach_mul_(g.exp_avg_sqs, g.beta2)
    torch._foreach_addcmul_(g.exp_avg_sqs, grads, grads, 1 - g.beta2)
    step_size = [-(lr / (1 - g.beta1 ** t)) for t in steps]
    bc2_sqrt = [(1 - g.beta2 ** t) ** 0.5 for t in steps]
    second = g.exp_avg_sqs
    if g.amsgrad:
        torch._foreach_maximum_(g.max_exp_avg_sqs, g.exp_avg_sqs)
        second = g.max_exp_avg_sqs
    denom = torch._foreach_sqrt(second)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, g.eps)
    torch._foreach_addcdiv_(work, g.exp_avgs, denom, step_size)
    for i in low:
        g.params[i].copy_(work[i])
    for i, m in enumerate(g.masters):
        if _is_split(m):
            hi, lo = split_master_encode(work[i])
            g.params[i].copy_(hi)
            m.copy_(lo)
    masters = [i for i, m in enumerate(g.masters) if m is not None and not _is_split(m)]
    if masters:
        torch._foreach_copy_([g.params[i] for i in masters], [g.masters[i] for i in masters])


# ----------------------------------------------------------------------------------------------
# Global gradient norm (one multi-tensor pass) and the standalone clip
# ----------------------------------------------------------------------------------------------
def _contiguous_kernel_grads(grads: list[Tensor]) -> bool:
    return all(x.is_contiguous() and x.dtype in _KERNEL_DTYPES and not x.is_sparse for x in grads)


@_backend.on_input_device
def _sumsq(grads: list[Tensor], backend: str) -> Tensor:
    """Sum of squares of all gradient elements as a 0-dim fp64 tensor on the grads' device."""
    if backend == "cpu":
        ext = _backend.cpu_ext()
        total = ext.adamw_grad_sumsq([x.data_ptr() for x in grads], [x.numel() for x in grads],
                                     [_backend.DTYPE_CODES[x.dtype] for x in grads])
        return torch.tensor(total, dtype=torch.float64)
    if backend == "triton":
        from fastft.kernels.adamw import sumsq_triton
        return sumsq_triton(grads)
    if backend == "cuda":
        return _cuda_sumsq(grads)
    # fp64 per-tensor norms: the reference must be at least as accurate as the kernels' fp64
    # accumulation (fp32 _foreach_norm was 3e-6 off on 65537 bf16 elements)
    norms = torch._foreach_norm([x.double() for x in grads], 2.0)
    return torch.stack(norms).square().sum()


def grad_sumsq(grads: list[Tensor], forced: str | None = None) -> Tensor:
    """Sum of squares of every element of ``grads`` (one pass, fp64 accumulation): 0-dim fp64
    tensor on the grads' device (CPU when ``grads`` is empty)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    backend = _backend.choose_backend("adamw", grads[0].device, forced)
    if backend != "torch" and not _contiguous_kernel_grads(grads):
        backend = "torch"
    return _sumsq(grads, backend).to(torch.float64)


def grad_norm(grads: list[Tensor], forced: str | None = None) -> Tensor:
    """Global L2 norm of a list of gradients (one pass, fp64 accumulation): 0-dim fp32 tensor."""
    if not grads:
        return torch.tensor(0.0)
    backend = _backend.choose_backend("adamw", grads[0].device, forced)
    if backend != "torch" and not _contiguous_kernel_grads(grads):
        backend = "torch"
    return _sumsq(grads, backend).sqrt().float()


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None,
                    forced: str | None = None) -> Tensor:
    """Drop-in ``torch.nn.utils.clip_grad_norm_``: scales grads in place so that their global
    ``norm_type``-norm is at most ``max_norm``; returns the pre-clip total norm (0-dim tensor).

    The L2 norm of contiguous fp32/bf16/fp16 grads on one device uses the fused one-pass kernel
    (fp64 accumulation, so it is fp32 for every grad dtype, where torch returns the grad dtype);
    other norms/layouts use torch's implementation. ``error_if_nonfinite`` and ``foreach``
    behave as in torch.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    devices = {x.device for x in grads}
    if norm_type == 2.0 and len(devices) == 1 and _contiguous_kernel_grads(grads):
        total = grad_norm(grads, forced)
    else:
        # empty grads contribute nothing (torch's inf-norm raises on them: no identity for max)
        nonempty = [x for x in grads if x.numel()]
        total = (torch.nn.utils.get_total_norm(nonempty, norm_type, False, foreach) if nonempty
                 else torch.tensor(0.0, device=grads[0].device))
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`")
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


# ----------------------------------------------------------------------------------------------
# The fused step: one backend choice for all groups
# ----------------------------------------------------------------------------------------------
def fused_adamw(groups: list[AdamWGroup], max_grad_norm: float | None = None,
                grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                forced: str | None = None) -> StepResult:
    """Clip (optional) + AdamW step over every group; see the module docstring for the maths.

    Args:
        groups: parameter groups (only parameters with grads), all on one device.
        max_grad_norm: clip the global L2 norm of all grads to this (None: no clipping, no norm).
            ``float('inf')`` computes the norm and skips non-finite steps without clipping.
        grad_scale: 0-dim fp32 tensor; grads are divided by it (GradScaler protocol).
        found_inf: 0-dim fp32 tensor; non-zero skips the step (GradScaler protocol).
        forced: backend name overriding ``FASTFT_BACKEND``.
    Returns:
        StepResult with the pre-clip norm and the skip flag, both tensors on the device.
    """
    params = [p for g in groups for p in g.params]
    if not params:
        dev = torch.device("cpu")
        return StepResult(None if max_grad_norm is None else torch.zeros((), device=dev),
                          torch.zeros((), dtype=torch.bool, device=dev))
    device = params[0].device
    backend = _backend.choose_backend("adamw", device, forced)
    if max_grad_norm is not None and max_grad_norm < 0:
        raise UserError(f"max_grad_norm={max_grad_norm}: expected a non-negative number or None")
    if backend == "cpu":
        return _step_cpu(groups, max_grad_norm, grad_scale, found_inf)
    if backend == "torch":
        return _step_torch(groups, max_grad_norm, grad_scale, found_inf)
    return _step_device(groups, max_grad_norm, grad_scale, found_inf, backend)


def _host_scalar(t: Tensor | None, default: float) -> float:
    return default if t is None else float(t)


def _step_cpu(groups, max_grad_norm, grad_scale, found_inf) -> StepResult:
    if _host_scalar(found_inf, 0.0) != 0.0:
        return StepResult(None if max_grad_norm is None else torch.tensor(float("nan")),
                          torch.tensor(True))
    inv_scale = 1.0 / _host_scalar(grad_scale, 1.0)
    cols: list[list] = [[] for _ in range(12)]
    hparams = []
    for k, g in enumerate(groups):
        ptrs = g.state_ptrs or group_state_ptrs(g)
        p, gr = g.params, g.grads
        cols[0] += [x.data_ptr() for x in p]
        cols[1] += [x.data_ptr() for x in gr]
        for c, col in enumerate(ptrs):
            cols[2 + c] += col
        cols[10] += [_backend.DTYPE_CODES[x.dtype] for x in gr]
        cols[11] += [k] * len(p)
        hparams.append((float(g.lr), g.beta1, g.beta2, g.eps, g.weight_decay, g.amsgrad, g.maximize))
    (p_, g_, m_, v_, vm_, w_, s_, n_, pd_, split_, gd_, grp_) = cols
    norm, skipped = _backend.cpu_ext().adamw_step(
        p_, g_, m_, v_, vm_, w_, s_, n_, pd_, gd_, grp_, hparams,
        -1.0 if max_grad_norm is None else float(max_grad_norm), inv_scale, split_)
    return StepResult(None if max_grad_norm is None else torch.tensor(norm, dtype=torch.float32),
                      torch.tensor(bool(skipped)))


def group_state_ptrs(g: AdamWGroup) -> tuple:
    """The C++ step's per-tensor address columns of a group (FusedAdamW caches them as the group's
    ``state_ptrs``): (exp_avg, exp_avg_sq, max_exp_avg_sq, master, step, numel, param dtype,
    master is split) columns; checks the masters (cached by FusedAdamW, so once per state change)."""
    n = len(g.params)
    for i, (p, m) in enumerate(zip(g.params, g.masters)):
        _check_master(p, m, f"param {i}")
    vmax = [x.data_ptr() for x in g.max_exp_avg_sqs] if g.amsgrad else [0] * n
    return ([x.data_ptr() for x in g.exp_avgs], [x.data_ptr() for x in g.exp_avg_sqs], vmax,
            [0 if m is None else m.data_ptr() for m in g.masters], [s.data_ptr() for s in g.steps],
            [x.numel() for x in g.params], [_backend.DTYPE_CODES[x.dtype] for x in g.params],
            [int(_is_split(m)) for m in g.masters])


def _step_torch(groups, max_grad_norm, grad_scale, found_inf) -> StepResult:
    # The reference path decides on the host (one sync on GPU; the fused backends do not).
    grads = [x for g in groups for x in g.grads]
    device = grads[0].device
    mult: float | Tensor = 1.0
    norm = None
    skip = _host_scalar(found_inf, 0.0) != 0.0
    if grad_scale is not None:
        mult = 1.0 / grad_scale.to(device=device, dtype=torch.float32)
    if max_grad_norm is not None and not skip:
        norm = (_sumsq(grads, "torch").sqrt().float() * (mult if grad_scale is not None else 1.0))
        skip = not bool(torch.isfinite(norm))
        coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        mult = coef * mult
    elif max_grad_norm is not None:
        norm = torch.tensor(float("nan"), device=device)
    if not skip:
        for g in groups:
            adamw_reference(g, mult)
    return StepResult(norm, torch.tensor(skip, device=device))


def _device_prep(groups, max_grad_norm, grad_scale, found_inf, sumsq_fn):
    """Norm, skip flag, grad multiplier and per-param bias corrections as device tensors
    (no host sync). Returns (norm, skip, ctrl[2] fp32 = (skip, mult), table[n, 2] fp32 =
    (-step_size, sqrt(bc2), 1 - lr*wd) per parameter in group order)."""
    device = groups[0].params[0].device
    grads = [x for g in groups for x in g.grads]
    one = torch.ones((), device=device)
    inv_scale = one if grad_scale is None else 1.0 / grad_scale.to(device, torch.float32)
    skip = torch.zeros((), dtype=torch.bool, device=device)
    if found_inf is not None:
        skip = skip | (found_inf.to(device) != 0)
    norm = None
    mult = inv_scale
    if max_grad_norm is not None:
        norm = sumsq_fn(grads).sqrt().float() * inv_scale
        skip = skip | ~torch.isfinite(norm)
        mult = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) * inv_scale
    keep = (~skip).float()
    tables = []
    for g in groups:
        if not g.steps:
            continue
        torch._foreach_add_(g.steps, keep)
        t = torch.stack(g.steps).double()
        bc1 = 1 - torch.pow(g.beta1, t)
        bc2 = 1 - torch.pow(g.beta2, t)
        lr = g.lr.to(device, torch.float64) if isinstance(g.lr, Tensor) else g.lr
        decay = (1 - lr * g.weight_decay) * torch.ones_like(t)
        tables.append(torch.stack([-(lr / bc1), bc2.sqrt(), decay], 1).float())
    ctrl = torch.stack([skip.float(), mult.float()])
    return norm, skip, ctrl, torch.cat(tables).contiguous()


def _step_device(groups, max_grad_norm, grad_scale, found_inf, backend) -> StepResult:
    with _backend.device_of(groups[0].params[0]):
        return _step_device_here(groups, max_grad_norm, grad_scale, found_inf, backend)


def _step_device_here(groups, max_grad_norm, grad_scale, found_inf, backend) -> StepResult:
    if backend == "triton":
        from fastft.kernels.adamw import adamw_triton, sumsq_triton
        for g in groups:
            for i, (p, m) in enumerate(zip(g.params, g.masters)):
                _check_master(p, m, f"param {i}")
        norm, skip, ctrl, table = _device_prep(groups, max_grad_norm, grad_scale, found_inf,
                                               sumsq_triton)
        adamw_triton(groups, ctrl, table)
    else:
        norm, skip, ctrl, table = _device_prep(groups, max_grad_norm, grad_scale, found_inf,
                                               _cuda_sumsq)
        _cuda_step(groups, ctrl, table)
    return StepResult(norm, skip)


# ----------------------------------------------------------------------------------------------
# CUDA glue (csrc/cuda/adamw.cu; compile-checked here, cannot run on this machine)
# ----------------------------------------------------------------------------------------------
def _cuda_sumsq(grads: list[Tensor]) -> Tensor:
    ext = _backend.cuda_ext()
    chunk = ext.adamw_chunk_size()
    nblocks = sum(math.ceil(x.numel() / chunk) for x in grads)
    partial = torch.zeros(max(nblocks, 1), dtype=torch.float64, device=grads[0].device)
    ext.adamw_sumsq([x.data_ptr() for x in grads], [x.numel() for x in grads],
                    [_backend.DTYPE_CODES[x.dtype] for x in grads], partial.data_ptr(),
                    torch.cuda.current_stream(grads[0].device).cuda_stream)
    return partial.sum()


def _cuda_step(groups: list[AdamWGroup], ctrl: Tensor, table: Tensor) -> None:
    ext = _backend.cuda_ext()
    stream = torch.cuda.current_stream(ctrl.device).cuda_stream
    row = 0
    for g in groups:  # one multi-tensor launch per group (group hyperparameters are arguments)
        n = len(g.params)
        if n == 0:
            continue
        m_, v_, vm_, w_, _s, numel, pdt, split = group_state_ptrs(g)
        ext.adamw_step([x.data_ptr() for x in g.params], [x.data_ptr() for x in g.grads], m_, v_,
                       vm_, w_, numel, pdt, [_backend.DTYPE_CODES[x.dtype] for x in g.grads],
                       table[row:row + n].data_ptr(), ctrl.data_ptr(), 1.0 - g.beta1, g.beta2, g.eps,
                       g.amsgrad, g.maximize, stream, split)
        row += n
