"""Triton kernels for the fused AdamW step and the global gradient norm (fastft.kernels.adamw).

The host side (fastft/ops/adamw.py: ``_device_prep``) leaves everything step-dependent on the
device, so nothing here synchronises with the host:

* ``ctrl``  fp32[2]   = (skip flag, grad multiplier = clip coefficient / grad_scale)
* ``table`` fp32[n,3] = per parameter (-lr / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr * wd)

A skipped step masks every load and store, so a non-finite norm changes nothing.
Split masters (``SPLIT``): the bf16 param, passed as int16 bits, is the high half of the fp32
master and ``w_ptr`` its int16 low half (fastft/ops/adamw.py ``split_master_encode``); the bit
arithmetic is on uint32, whose wrap-around is defined (int32 overflow is not).
Per-element maths follows csrc/include/fastft/adamw.h (torch.optim.AdamW's operation order),
with correctly rounded division and square root (``div_rn``/``sqrt_rn``): Triton's default
``/`` and ``sqrt`` are approximate on GPUs and would drift from the reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# 4096 elements per program: 16 KiB of fp32 per stream, a few hundred programs per 1M params.
BLOCK = 4096


@triton.jit
def _sumsq_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # x: (n,) fp32/bf16/fp16 -> out[pid]: fp32 sum of squares of this program's block
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: offsets pass 2^31 elements on big activations (tests/test_int64_offsets.py)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(x * x, axis=0))


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, ctrl_ptr, tab_ptr, n,
                  w1, beta2, omb2, eps,
                  AMSGRAD: tl.constexpr, MASTER: tl.constexpr, SPLIT: tl.constexpr,
                  MAXIMIZE: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr):
    # p: (n,) param dtype (int16 bits of a bf16 param when SPLIT); g: (n,) param dtype or fp32;
    # m, v, vmax: (n,) fp32; w: (n,) fp32 master, or int16 low half when SPLIT
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: offsets pass 2^31 elements on big activations (tests/test_int64_offsets.py)
    skip = tl.load(ctrl_ptr)
    mult = tl.load(ctrl_ptr + 1)
    neg_step = tl.load(tab_ptr)
    bc2_sqrt = tl.load(tab_ptr + 1)
    decay = tl.load(tab_ptr + 2)
    mask = offs < tl.where(skip == 0.0, n, 0)  # skipped step: every load/store masked off
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * mult
    if MAXIMIZE:
        g = -g
    if SPLIT:  # b = (uint32(hi) << 16) + int32(lo), mod 2^32
        hi = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        lo = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.int32).to(tl.uint32, bitcast=True)
        p = ((hi << 16) + lo).to(tl.float32, bitcast=True)
    elif MASTER:
        p = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = p * decay
    d = g - m
    m = tl.where(w1 < 0.5, m + w1 * d, g - d * (1.0 - w1))  # torch.lerp's two-sided formula
    v = v * beta2
    v = v + omb2 * g * g
    vv = v
    if AMSGRAD:
        vm = tl.load(vmax_ptr + offs, mask=mask, other=0.0)
        vm = tl.maximum(vm, v)
        tl.store(vmax_ptr + offs, vm, mask=mask)
        vv = vm
    denom = tl.div_rn(tl.sqrt_rn(vv), bc2_sqrt) + eps
    p = p + neg_step * tl.div_rn(m, denom)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    if SPLIT:  # hi = (b + 0x8000) >> 16, lo = the low 16 bits of b read as int16
        b = p.to(tl.uint32, bitcast=True)
        hi = (b + 0x8000) >> 16
        tl.store(p_ptr + offs, hi.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        tl.store(w_ptr + offs, (b & 0xFFFF).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif MANUAL_BF16_RNE:
        # Interpreter only: its fp32->bf16 cast truncates (triton 3.9 interpreter.py cast_impl),
        # so round to nearest even by hand; on GPUs the cast below is already RNE.
        bits = p.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(p_ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def sumsq_triton(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements of contiguous ``grads`` (any shapes): 0-dim fp64 tensor.

    One launch per tensor writes per-block fp32 partials into one buffer; the partials are
    summed in fp64 on the device (no host sync)."""
    device = grads[0].device
    nblocks = [triton.cdiv(x.numel(), BLOCK) for x in grads]
    partial = torch.zeros(max(sum(nblocks), 1), dtype=torch.float32, device=device)
    off = 0
    for x, nb in zip(grads, nblocks):
        if nb:
            _sumsq_kernel[(nb,)](x, partial[off:], x.numel(), BLOCK=BLOCK)
        off += nb
    return partial.double().sum()


def adamw_triton(groups, ctrl: torch.Tensor, table: torch.Tensor) -> None:
    """Launch the update for every parameter of ``groups`` (fastft.ops.adamw.AdamWGroup list).

    ``ctrl``: fp32[2] (skip, grad multiplier); ``table``: fp32[n_params, 3] in group order."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    row = 0
    for g in groups:
        w1, beta2, omb2 = 1.0 - g.beta1, g.beta2, 1.0 - g.beta2
        for i, p in enumerate(g.params):
            n = p.numel()
            if n:
                master = g.masters[i]
                split = master is not None and master.dtype == torch.int16
                if split and p.dtype != torch.bfloat16:
                    raise ValueError(f"adamw_triton: param {i} has a split (int16) master but dtype "
                                     f"{p.dtype}; split masters need bf16 params")
                vmax = g.max_exp_avg_sqs[i] if g.amsgrad else g.exp_avg_sqs[i]
                _adamw_kernel[(triton.cdiv(n, BLOCK),)](
                    p.view(torch.int16) if split else p, g.grads[i], g.exp_avgs[i],
                    g.exp_avg_sqs[i], vmax, master if master is not None else g.exp_avgs[i],
                    ctrl, table[row], n, w1, beta2, omb2, g.eps,
                    AMSGRAD=g.amsgrad, MASTER=master is not None and not split, SPLIT=split,
                    MAXIMIZE=g.maximize,
                    MANUAL_BF16_RNE=interpret and p.dtype == torch.bfloat16, BLOCK=BLOCK)
            row += 1
