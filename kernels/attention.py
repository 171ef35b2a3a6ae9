"""Triton kernels of the causal GQA attention (fastft.kernels.attention); maths and layouts in
fastft/ops/attention.py and csrc/include/fastft/attention.h (the names below follow it).

* forward: one program per (query tile of BM rows, batch * query head); it streams the key/value
  tiles up to the diagonal with an online softmax (running max ``m``, running sum ``l``, fp32
  accumulator) and writes the output and the fp32 ``lse = m + log(l)`` per row.
* backward: ``delta_i = do_i . o_i`` (one small kernel into an fp32 scratch), then dK/dV with one
  program per (key tile, batch * kv head) that loops over the group's G query heads and the query
  tiles at or below the diagonal (so it owns its dK/dV rows: no atomics), then dQ with one program
  per (query tile, batch * query head) looping over the key tiles up to the diagonal. Both recompute
  ``p = exp(scale * q.k - lse)`` from the saved lse (no T x T tensor is stored).

Packed rows (``SEGMENTS``): (B, T) int32 sample starts/ends per token. A query tile's key loop
starts at the key tile holding its first row's sample start (starts never decrease along a row),
and a key tile's query loop stops at the end of its last key's sample, so tiles that lie wholly
across a sample boundary are never visited; inside a visited tile ``key >= start[query]`` masks.

Tensors are (B, H, T, D) views with arbitrary (batch, head, time) strides and a unit last-dim
stride; the head dim is padded to a power of two (>= 16, tl.dot's minimum) with masks.

Precision: scores, softmax and accumulators are fp32. On a GPU the 16-bit paths feed p and ds to
the second GEMMs in the input dtype (as flash-attention does) and fp32 inputs use
``input_precision="ieee"`` (TF32 would miss the fp32 tolerances). Under ``TRITON_INTERPRET=1``
``tl.dot`` on bf16 operands multiplies raw bit patterns (triton-lang/triton#11584): the launchers
set ``UPCAST`` only when interpreting bf16, which runs those dots on fp32 operands after the same
bf16 rounding the GPU path applies (rounded by hand: the interpreter's bf16 cast truncates).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastft.kernels._cast import to_out

MAX_HEAD_DIM = 256  # largest head dim the launchers accept (tile table below)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32 a @ b for operands already in the GEMM dtype (see the module docstring)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, start_ptr, T, D, Hq, G, scale,
                     qs_b, qs_h, qs_t, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t, os_b, os_h, os_t,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr,
                     SEGMENTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    dmask = rd < D
    q = tl.load(q_ptr + b * qs_b + h * qs_h + rm[:, None] * qs_t + rd[None, :],
                mask=(rm[:, None] < T) & dmask[None, :], other=0.0)  # (BM, BD)
    k_base = k_ptr + b * ks_b + hk * ks_h
    v_base = v_ptr + b * vs_b + hk * vs_h
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BM, T)  # keys after the tile's last query are all masked
    lo = 0
    if SEGMENTS:  # packed rows: starts are nondecreasing, so the tile's first row has the smallest
        st = tl.load(start_ptr + b * T + rm, mask=rm < T, other=T)  # each row's sample start
        lo = (tl.load(start_ptr + b * T + pid_m * BM) // BN) * BN  # earlier key tiles: all masked
    for n0 in range(lo, hi, BN):
        rn = n0 + tl.arange(0, BN)
        kt = tl.load(k_base + rn[None, :] * ks_t + rd[:, None],
                     mask=(rn[None, :] < T) & dmask[:, None], other=0.0)  # (BD, BN)
        s = _dot(q, kt, UPCAST, IEEE) * scale  # scaled scores (BM, BN)
        visible = (rn[None, :] <= rm[:, None]) & (rn[None, :] < T)
        if SEGMENTS:
            visible = visible & (rn[None, :] >= st[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if SEGMENTS:  # a row whose sample starts in a later tile has seen no key yet: keep m, l at 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # key 0 is in the first tile and visible to every row: m_new is finite from then on
            m_use = m_new
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])  # attn_prob with the running max in place of lse
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rn[:, None] * vs_t + rd[None, :],
                    mask=(rn[:, None] < T) & dmask[None, :], other=0.0)  # (BN, BD)
        acc = acc * alpha[:, None] + _dot(to_out(p, v.dtype, MANUAL_BF16_RNE), v, UPCAST, IEEE)
        m_i = m_new
    o = acc / l_i[:, None]
    rmask = rm < T
    tl.store(o_ptr + b * os_b + h * os_h + rm[:, None] * os_t + rd[None, :],
             to_out(o, o_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * T + rm, m_i + tl.log(l_i), mask=rmask)  # attn_lse


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, T, D, Hq, os_b, os_h, os_t, dos_b, dos_h, dos_t,
                           BM: tl.constexpr, BD: tl.constexpr):
    # delta (B, Hq, T) fp32 contiguous: do_i . o_i with o as stored (rounded), like the CPU kernel
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    mask = (rm[:, None] < T) & (rd[None, :] < D)
    o = tl.load(o_ptr + b * os_b + h * os_h + rm[:, None] * os_t + rd[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * dos_b + h * dos_h + rm[:, None] * dos_t + rd[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * T + rm, delta, mask=rm < T)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, start_ptr, end_ptr,
                          T, D, Hq, Hkv, G, scale,
                          qs_b, qs_h, qs_t, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t, dos_b, dos_h, dos_t,
                          dks_b, dks_h, dks_t, dvs_b, dvs_h, dvs_t,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr,
                          SEGMENTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    # works on transposed scores sT = k q^T (BN, BM): dv += pT do, dk += dsT q
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    hk = (bh % Hkv).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rd = tl.arange(0, BD)
    dmask = rd < D
    nmask = (rn[:, None] < T) & dmask[None, :]
    k = tl.load(k_ptr + b * ks_b + hk * ks_h + rn[:, None] * ks_t + rd[None, :], mask=nmask, other=0.0)
    v = tl.load(v_ptr + b * vs_b + hk * vs_h + rn[:, None] * vs_t + rd[None, :], mask=nmask, other=0.0)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    lo = (pid_n * BN // BM) * BM  # first query tile that sees one of these keys
    q_hi = T
    if SEGMENTS:  # queries past the sample of the tile's last key see none of its keys
        q_hi = tl.load(end_ptr + b * T + tl.minimum(pid_n * BN + BN, T) - 1)
    for g in range(0, G):
        h = hk * G + g
        q_base = q_ptr + b * qs_b + h * qs_h
        do_base = do_ptr + b * dos_b + h * dos_h
        row_base = (b * Hq + h) * T
        for m0 in range(lo, q_hi, BM):
            rm = m0 + tl.arange(0, BM)
            mmask = (rm[:, None] < T) & dmask[None, :]
            q = tl.load(q_base + rm[:, None] * qs_t + rd[None, :], mask=mmask, other=0.0)  # (BM, BD)
            do = tl.load(do_base + rm[:, None] * dos_t + rd[None, :], mask=mmask, other=0.0)
            lse = tl.load(lse_ptr + row_base + rm, mask=rm < T, other=0.0)
            delta = tl.load(delta_ptr + row_base + rm, mask=rm < T, other=0.0)
            st = _dot(k, tl.trans(q), UPCAST, IEEE)  # unscaled q.k, (BN, BM)
            visible = (rn[:, None] <= rm[None, :]) & (rm[None, :] < T)
            if SEGMENTS:
                q_start = tl.load(start_ptr + b * T + rm, mask=rm < T, other=T)
                visible = visible & (rn[:, None] >= q_start[None, :])
            pt = tl.where(visible, tl.exp(st * scale - lse[None, :]), 0.0)  # attn_prob
            dv += _dot(to_out(pt, do.dtype, MANUAL_BF16_RNE), do, UPCAST, IEEE)
            dpt = _dot(v, tl.trans(do), UPCAST, IEEE)
            dst = scale * pt * (dpt - delta[None, :])  # attn_dscore (0 where pt is masked)
            dk += _dot(to_out(dst, q.dtype, MANUAL_BF16_RNE), q, UPCAST, IEEE)
    tl.store(dk_ptr + b * dks_b + hk * dks_h + rn[:, None] * dks_t + rd[None, :],
             to_out(dk, dk_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=nmask)
    tl.store(dv_ptr + b * dvs_b + hk * dvs_h + rn[:, None] * dvs_t + rd[None, :],
             to_out(dv, dv_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=nmask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, T, D, Hq, G, scale,
                        qs_b, qs_h, qs_t, ks_b, ks_h, ks_t, vs_b, vs_h, vs_t, dos_b, dos_h, dos_t,
                        dqs_b, dqs_h, dqs_t,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr,
                        SEGMENTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    hk = h // G
    rm = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    dmask = rd < D
    mmask = (rm[:, None] < T) & dmask[None, :]
    q = tl.load(q_ptr + b * qs_b + h * qs_h + rm[:, None] * qs_t + rd[None, :], mask=mmask, other=0.0)
    do = tl.load(do_ptr + b * dos_b + h * dos_h + rm[:, None] * dos_t + rd[None, :], mask=mmask, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + rm, mask=rm < T, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rm, mask=rm < T, other=0.0)
    k_base = k_ptr + b * ks_b + hk * ks_h
    v_base = v_ptr + b * vs_b + hk * vs_h
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BM, T)
    lo = 0
    if SEGMENTS:  # as in the forward
        st = tl.load(start_ptr + b * T + rm, mask=rm < T, other=T)
        lo = (tl.load(start_ptr + b * T + pid_m * BM) // BN) * BN
    for n0 in range(lo, hi, BN):
        rn = n0 + tl.arange(0, BN)
        kt = tl.load(k_base + rn[None, :] * ks_t + rd[:, None], mask=(rn[None, :] < T) & dmask[:, None], other=0.0)
        vt = tl.load(v_base + rn[None, :] * vs_t + rd[:, None], mask=(rn[None, :] < T) & dmask[:, None], other=0.0)
        s = _dot(q, kt, UPCAST, IEEE)  # unscaled (BM, BN)
        visible = (rn[None, :] <= rm[:, None]) & (rn[None, :] < T)
        if SEGMENTS:
            visible = visible & (rn[None, :] >= st[:, None])
        p = tl.where(visible, tl.exp(s * scale - lse[:, None]), 0.0)  # attn_prob
        dp = _dot(do, vt, UPCAST, IEEE)
        ds = scale * p * (dp - delta[:, None])  # attn_dscore
        dq += _dot(to_out(ds, kt.dtype, MANUAL_BF16_RNE), tl.trans(kt), UPCAST, IEEE)
    tl.store(dq_ptr + b * dqs_b + h * dqs_h + rm[:, None] * dqs_t + rd[None, :],
             to_out(dq, dq_ptr.dtype.element_ty, MANUAL_BF16_RNE), mask=mmask)


# The interpreter runs one numpy call per block op, so fewer, larger tiles are faster there.
_INTERPRETER_TILES = (32, 32, 4)  # BM, BN, num_warps


def _gpu_tiles(bd: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BM, BN, num_warps) on a GPU for padded head dim ``bd``.

    Chosen so every kernel's shared memory fits the 99 KB of sm_86/89 (sm_80 has 163 KB).
    Compiled for sm_80 with triton 3.9, the 16-bit kernels take at most 73 KB at D <= 128 with
    64x64 tiles and 80 KB at D = 256 with 32x32; the fp32 kernels (ieee dots, no tensor cores)
    stage far more (64x64 at D = 128: 209 KB, over every GPU's limit), so they get 32x32 up to
    D = 64 (52 KB), 32x16 at 128 (82 KB), 16x16 at 256 (97 KB). tests/test_attention_triton.py
    compiles them for sm_80 (no GPU needed) and checks the limit; their speed is unmeasured (no
    GPU on the machine this was written on)."""
    if dtype == torch.float32:
        return {64: (32, 32, 4), 128: (32, 16, 4), 256: (16, 16, 4)}[max(bd, 64)]
    return {64: (64, 64, 4), 128: (64, 64, 4), 256: (32, 32, 8)}[max(bd, 64)]


def _config(d: int, dtype: torch.dtype) -> dict:
    """Launch parameters for head dim ``d``: tiles, warps and the constexpr precision flags."""
    if d > MAX_HEAD_DIM:
        raise ValueError(f"attention (triton): head dim {d} > {MAX_HEAD_DIM} is not supported")
    bd = max(16, triton.next_power_of_2(d))
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    bm, bn, warps = _INTERPRETER_TILES if interp else _gpu_tiles(bd, dtype)
    flags = dict(UPCAST=interp and dtype == torch.bfloat16, IEEE=dtype == torch.float32,
                 MANUAL_BF16_RNE=interp and dtype == torch.bfloat16)
    return dict(BM=bm, BN=bn, BD=bd, num_warps=warps, **flags)


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, scale: float, start: torch.Tensor | None = None,
                         end: torch.Tensor | None = None) -> None:
    """Causal GQA attention forward (packed rows when ``start``/``end`` are given).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D); one dtype (fp32/bf16/fp16), unit last-dim stride,
            any (batch, head, time) strides.
        out: (B, Hq, T, D) output view in q's dtype (unit last-dim stride), fully overwritten.
        lse: (B, Hq, T) fp32 contiguous, overwritten with each row's log-sum-exp of scaled scores.
        scale: score multiplier.
        start, end: None, or (B, T) int32 contiguous sample starts / ends per token
            (fastft.ops.segments.Segments): query i sees keys start[b, i] .. i only.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if B == 0 or T == 0:
        return
    cfg = _config(D, q.dtype)
    grid = (triton.cdiv(T, cfg["BM"]), B * Hq)
    _attn_fwd_kernel[grid](q, k, v, out, lse, lse if start is None else start, T, D, Hq, Hq // Hkv, scale,
                           *_s3(q), *_s3(k), *_s3(v), *_s3(out), SEGMENTS=start is not None, **cfg)


def attention_bwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         dout: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                         dv: torch.Tensor, scale: float, start: torch.Tensor | None = None,
                         end: torch.Tensor | None = None) -> None:
    """Causal GQA attention backward (probabilities recomputed from ``lse``).

    Args:
        q, k, v, out, lse, scale: as given to / produced by :func:`attention_fwd_triton`.
        dout: (B, Hq, T, D) gradient of ``out``, unit last-dim stride.
        dq: (B, Hq, T, D); dk, dv: (B, Hkv, T, D): output views in q's dtype, fully overwritten
            (dk/dv summed over the query heads of each kv head).
        start, end: as given to :func:`attention_fwd_triton`.
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if B == 0 or T == 0:
        return
    cfg = _config(D, q.dtype)
    G = Hq // Hkv
    delta = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, cfg["BM"]), B * Hq)](
        out, dout, delta, T, D, Hq, *_s3(out), *_s3(dout), BM=cfg["BM"], BD=cfg["BD"])
    seg = start is not None
    if seg and end is None:
        raise ValueError("attention (triton): packed rows need both start and end")
    st, en = (start, end) if seg else (lse, lse)  # unread placeholders without segments
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, cfg["BN"]), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, st, en, T, D, Hq, Hkv, G, scale,
        *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(dk), *_s3(dv), SEGMENTS=seg, **cfg)
    _attn_bwd_dq_kernel[(triton.cdiv(T, cfg["BM"]), B * Hq)](
        q, k, v, dout, lse, delta, dq, st, T, D, Hq, G, scale,
        *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(dq), SEGMENTS=seg, **cfg)
