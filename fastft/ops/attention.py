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

Packed rows (several samples per row, or a pad tail): ``segments`` (:mod:`fastft.ops.segments`,
built from ``cu_seqlens``, ``position_ids`` or ``segment_ids``) restricts query i to keys
``start[b, i] .. i`` of its own sample. The kernels take the per-token (B, T) int32 ``start`` and
``end`` (no T x T mask), skip key tiles before a query tile's first sample and query tiles after a
key tile's last one; the CPU kernel runs each sample as its own causal problem. On CUDA the vendor
varlen route (``torch.nn.attention.varlen``) serves it where torch has it, else fastft's kernel.

Backends (one choice, :func:`causal_attention`): ``cpu`` (csrc/cpu/attention.cpp), ``triton``
(kernels/attention.py), ``cuda`` (csrc/cuda/attention.cu); the ``torch`` fallback is PyTorch's
own fused ``scaled_dot_product_attention`` (a T x T reference would be slow and memory-hungry
as a fallback), also used for dtypes other than fp32/bf16/fp16 and, on the GPU backends, for
head dims above 256. :func:`attention_reference` (fp32 maths, materialised scores) is the test oracle.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft import _backend
from fastft.ops.segments import Segments, segments_from_cu_seqlens, segments_from_ids, segments_from_position_ids

__all__ = ["AttentionSaved", "Segments", "attention_bwd", "attention_fwd", "attention_kernel_ok",
           "attention_reference", "causal_attention", "packed_rows_supported"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest head dim of the GPU kernels (kernels/attention.py MAX_HEAD_DIM, csrc/cuda/attention.cu
# kMaxHeadDim: their tiles keep (tile, D) fp32 accumulators in registers); larger ones run SDPA.
_GPU_MAX_HEAD_DIM = 256


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                        segments: Segments | None = None) -> Tensor:
    """Causal GQA attention in fp32 maths with materialised scores and mask: the test oracle.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0; one float dtype.
        scale: score multiplier (default 1/sqrt(D)).
        segments: packed-row layout ((B, T) starts); query i sees keys start[b, i] .. i.
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
    if segments is not None:  # (B, 1, T, T): also hide keys before the query's sample
        j = torch.arange(t, device=q.device)
        mask = mask | (j[None, None, :] < segments.start.to(q.device).long()[:, :, None])[:, None]
    p = s.masked_fill(mask, float("-inf")).softmax(-1)
    return (p @ vf).to(q.dtype)


def _strides(t: Tensor) -> list[int]:
    return [t.stride(0), t.stride(1), t.stride(2)]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _seg_args(*tables: Tensor | None) -> tuple[int, ...]:
    """The extensions' trailing segment-table addresses: none for causal rows (so an extension
    built before packed rows still runs them), else each table's address."""
    return () if tables[0] is None else tuple(t.data_ptr() for t in tables)


def _ext_takes_segments(ext) -> bool:
    """Whether a built extension's attention takes packed rows (extensions built before issue 20
    do not: their packed calls take the pure-PyTorch path until rebuilt)."""
    return "seg_start" in (getattr(ext.attention_fwd, "__doc__", None) or "")


def _bthd(b: int, t: int, h: int, d: int, like: Tensor) -> Tensor:
    """A (B, H, T, D) view of a fresh (B, T, H, D)-contiguous tensor."""
    return torch.empty(b, t, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def attention_kernel_ok(dtype: torch.dtype, head_dim: int, backend: str) -> bool:
    """Whether the fused kernels of ``backend`` run this dtype and head dim (:func:`attention_fwd`
    needs it; otherwise :func:`causal_attention` runs PyTorch's SDPA)."""
    return dtype in _KERNEL_DTYPES and not (backend in ("triton", "cuda") and head_dim > _GPU_MAX_HEAD_DIM)


class AttentionSaved(NamedTuple):
    """What :func:`attention_fwd` keeps for :func:`attention_bwd`."""

    q: Tensor  # (B, Hq, T, D), last dim contiguous
    k: Tensor  # (B, Hkv, T, D)
    v: Tensor  # (B, Hkv, T, D)
    out: Tensor  # (B, Hq, T, D) view of a (B, T, Hq, D)-contiguous tensor
    lse: Tensor  # (B, Hq, T) fp32 log-sum-exp of the scaled scores
    scale: float
    backend: str
    segments: Segments | None


@_backend.on_input_device
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str,
                  segments: Segments | None = None) -> tuple[Tensor, AttentionSaved]:
    """The fused causal attention forward on one kernel backend, without autograd (for callers
    building their own autograd node, with :func:`attention_bwd`; :func:`causal_attention` is the
    differentiable op with the input checks and fallbacks).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D), Hq % Hkv == 0; one dtype accepted by
            :func:`attention_kernel_ok`; any strides (a strided last dim is copied).
        scale: score multiplier.
        backend: ``cpu``, ``triton`` or ``cuda``.
        segments: packed-row layout ((B, T)) or None for causal rows.
    Returns:
        (out, saved): out (B, Hq, T, D) in q's dtype, a view of a (B, T, Hq, D)-contiguous tensor.
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    out = _bthd(b, t, hq, d, q)
    lse = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    start, end = (None, None) if segments is None else (segments.start, segments.end)
    if backend == "cpu":
        _backend.cpu_ext().attention_fwd(q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                                         _strides(v), out.data_ptr(), _strides(out), lse.data_ptr(),
                                         b, hq, hkv, t, d, float(scale), _backend.DTYPE_CODES[q.dtype],
                                         *_seg_args(start))
    elif backend == "triton":
        from fastft.kernels.attention import attention_fwd_triton
        attention_fwd_triton(q, k, v, out, lse, float(scale), start, end)
    else:
        _backend.cuda_ext().attention_fwd(q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(),
                                          _strides(v), out.data_ptr(), _strides(out), lse.data_ptr(),
                                          b, hq, hkv, t, d, float(scale), _backend.DTYPE_CODES[q.dtype],
                                          torch.cuda.current_stream(q.device).cuda_stream, *_seg_args(start))
    return out, AttentionSaved(q, k, v, out, lse, scale, backend, segments)


def attention_bwd(saved: AttentionSaved, dout: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`attention_fwd`.

    Args:
        saved: the forward's second result.
        dout: (B, Hq, T, D) gradient of out (any strides with a contiguous last dim, else copied).
    Returns:
        (dq, dk, dv): shaped like q, k, v, each a (B, H, T, D) view of a (B, T, H, D)-contiguous
        tensor, in q's dtype.
    """
    q, k, v, out, lse = saved.q, saved.k, saved.v, saved.out, saved.lse
    with _backend.device_of(q):
        dout = _last_dim_contiguous(dout)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        dq, dk, dv = _bthd(b, t, hq, d, q), _bthd(b, t, hkv, d, k), _bthd(b, t, hkv, d, v)
        args = (q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
                out.data_ptr(), _strides(out), dout.data_ptr(), _strides(dout), lse.data_ptr(),
                dq.data_ptr(), _strides(dq), dk.data_ptr(), _strides(dk), dv.data_ptr(), _strides(dv),
                b, hq, hkv, t, d, float(saved.scale), _backend.DTYPE_CODES[q.dtype])
        seg = saved.segments
        start, end = (None, None) if seg is None else (seg.start, seg.end)
        if saved.backend == "cpu":
            _backend.cpu_ext().attention_bwd(*args, *_seg_args(start))
        elif saved.backend == "triton":
            from fastft.kernels.attention import attention_bwd_triton
            attention_bwd_triton(q, k, v, out, dout, lse, dq, dk, dv, float(saved.scale), start, end)
        else:
            _backend.cuda_ext().attention_bwd(*args, torch.cuda.current_stream(q.device).cuda_stream,
                                              *_seg_args(start, end))
    return dq, dk, dv


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str,
                segments: Segments | None = None) -> Tensor:
        out, s = attention_fwd(q, k, v, scale, backend, segments)
        ctx.save_for_backward(s.q, s.k, s.v, s.out, s.lse)
        ctx.scale, ctx.backend, ctx.segments = scale, backend, segments
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        saved = AttentionSaved(*ctx.saved_tensors, ctx.scale, ctx.backend, ctx.segments)
        dq, dk, dv = attention_bwd(saved, dout)
        return dq, dk, dv, None, None, None


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


def packed_rows_supported(device: torch.device | str) -> bool:
    """Whether the attention backend chosen for ``device`` runs packed rows in fastft's kernels
    (False only for a C++/CUDA extension built before packed rows existed)."""
    backend = _backend.choose_backend("attention", device)
    if backend == "cpu":
        return _ext_takes_segments(_backend.cpu_ext())
    if backend == "cuda":
        return _ext_takes_segments(_backend.cuda_ext())
    return True


def _segments_of(q: Tensor, segments, cu_seqlens, position_ids, segment_ids) -> Segments | None:
    """The one packed-row description given (at most one), checked against q's (B, T)."""
    given = [n for n, x in (("segments", segments), ("cu_seqlens", cu_seqlens), ("position_ids", position_ids),
                            ("segment_ids", segment_ids)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"causal_attention: give one of segments, cu_seqlens, position_ids, segment_ids; got {given}")
    if not given:
        return None
    b, _, t, _ = q.shape
    if cu_seqlens is not None:
        segments = segments_from_cu_seqlens(cu_seqlens, b, t)
    elif position_ids is not None:
        segments = segments_from_position_ids(position_ids.expand(b, -1) if position_ids.shape[0] == 1
                                              else position_ids)
    elif segment_ids is not None:
        segments = segments_from_ids(segment_ids)
    if not isinstance(segments, Segments):
        raise ValueError(f"causal_attention: segments is a {type(segments).__name__}, expected fastft Segments")
    if segments.shape != (b, t):
        raise ValueError(f"causal_attention: segments of shape {segments.shape}, expected (B, T) = ({b}, {t})")
    return segments.to(q.device)


def _segment_attention_torch(q: Tensor, k: Tensor, v: Tensor, scale: float, seg: Segments,
                             chunk: int = 128) -> Tensor:
    """The pure-PyTorch fallback for packed rows: SDPA over blocks of ``chunk`` queries, each
    reading only the keys from its first sample's start (a (B, 1, chunk, window) mask per block,
    never T x T); differentiable by autograd."""
    t = q.shape[2]
    outs = []
    start = seg.start.long()
    for c0 in range(0, t, chunk):
        c1 = min(t, c0 + chunk)
        lo = int(start[:, c0].min().item())
        j = torch.arange(lo, c1, device=q.device)
        i = torch.arange(c0, c1, device=q.device)
        allowed = (j[None, None, :] <= i[None, :, None]) & (j[None, None, :] >= start[:, c0:c1, None])
        outs.append(F.scaled_dot_product_attention(q[:, :, c0:c1], k[:, :, lo:c1], v[:, :, lo:c1],
                                                   attn_mask=allowed[:, None], scale=scale,
                                                   enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(outs, 2) if outs else q.new_empty(q.shape)


def _varlen_route():
    """torch's FlashAttention varlen op and how to ask it for causal GQA, or None where this
    torch lacks it (the op arrived in torch 2.10; window_size/enable_gqa later)."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else (
        {"is_causal": True} if "is_causal" in params else None)
    if causal is None:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def _varlen_cuda(q: Tensor, k: Tensor, v: Tensor, scale: float, seg: Segments) -> Tensor | None:
    """Packed rows through torch's FlashAttention varlen kernel on CUDA (fp16/bf16), or None when
    it cannot serve the call (no such op, GQA without enable_gqa, fp32, head dim > 256)."""
    route = _varlen_route()
    if route is None or q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] > 256:
        return None
    fn, causal, gqa = route
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if hkv != hq and not gqa:
        return None
    cu, longest = seg.cu_seqlens()
    # (B, H, T, D) views of (B, T, H, D) projections flatten to varlen's (B * T, H, D) for free
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    extra = {"enable_gqa": True} if hkv != hq else {}
    try:
        o = fn(*flat, cu, cu, longest, longest, scale=scale, **causal, **extra)
    except (RuntimeError, NotImplementedError) as e:  # e.g. a GPU older than the kernel supports
        _backend._warn_once("attention_varlen", f"fastft: torch varlen attention unavailable ({e}); "
                            "packed rows use fastft's CUDA kernel")
        return None
    return o.view(b, t, hq, d).transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                     forced: str | None = None, *, segments: Segments | None = None,
                     cu_seqlens: Tensor | None = None, position_ids: Tensor | None = None,
                     segment_ids: Tensor | None = None) -> Tensor:
    """Causal self-attention (see the module docstring for the maths and layouts).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D), Hq % Hkv == 0; fp32/bf16/fp16, one device, any
            strides (a non-contiguous last dim is copied).
        scale: score multiplier (default 1/sqrt(D)).
        forced: backend name overriding ``FASTFT_BACKEND``.
        segments / cu_seqlens / position_ids / segment_ids: at most one packed-row description
            (:mod:`fastft.ops.segments`): a :class:`Segments`, (N + 1,) int cumulative lengths
            over the B * T tokens, (B, T) positions restarting at 0 per sample, or (B, T) sample
            ids. Query i then sees only keys of its own sample up to i.
    Returns:
        (B, Hq, T, D) in q's dtype (a view of a (B, T, Hq, D)-contiguous tensor on the kernel
        backends); differentiable in q, k, v.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seg = _segments_of(q, segments, cu_seqlens, position_ids, segment_ids)
    backend = _backend.choose_backend("attention", q.device, forced)
    if seg is not None and q.is_cuda and forced is None:
        # packed rows on CUDA: the vendor's FlashAttention varlen kernel where torch has it; else
        # fastft's kernel even where the vendor SDPA is the default (SDPA would need a mask)
        out = _varlen_cuda(q, k, v, scale, seg)
        if out is not None:
            return out
        if backend == "torch":
            backend = next((b for b in _backend.available_backends("attention", q.device) if b != "torch"), "torch")
    if seg is not None and backend in ("cpu", "cuda"):
        ext = _backend.cpu_ext() if backend == "cpu" else _backend.cuda_ext()
        if not _ext_takes_segments(ext):
            _backend._warn_once(f"attention_segments_{backend}",
                                f"fastft: the built {backend} extension predates packed rows; they run the "
                                "pure-PyTorch path until it is rebuilt (pip install -e . / setup.py build_ext)")
            backend = "torch"
    if backend == "torch" or not attention_kernel_ok(q.dtype, q.shape[-1], backend):
        if seg is not None:
            return _segment_attention_torch(q, k, v, scale, seg)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    return _AttentionFn.apply(q, k, v, scale, backend, seg)
