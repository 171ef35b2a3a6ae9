"""LoRA linear on a frozen float or 8-bit base weight: reference, autograd.Function, backend choice.

Maths (Hu et al., "LoRA", 2021; the int8 base as in Dettmers et al., "LLM.int8()", 2022)::

    y  = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ          x: (N, in)  W: (out, in)  A: (r, in)  B: (out, r)
    dX = dY W + s · ((dY B) A) ⊙ m                  m: the dropout mask (0 or 1/(1-p)), 1 without dropout
    dA = s · (dY B)ᵀ drop(x)       dB = s · dYᵀ (drop(x) Aᵀ)

W never gets a gradient (frozen). The rank-r products are bracketed so that nothing of size
(N, out) or (N, in) is built besides y and dX: the LoRA terms are accumulated in place into
the base GEMM's output (``addmm_``). The forward saves ``drop(x)`` (which is ``x`` without
dropout) and ``u = drop(x) Aᵀ`` (N, r) — never ``x Wᵀ``; the dropout mask is regenerated in the
backward from a seed, per block of rows, so it is never stored.

8-bit base (:class:`Int8Weight`): symmetric per-output-channel absmax quantisation
``W[o, j] ≈ q[o, j] · scale[o]``, q in [-127, 127]; optional outlier input columns (max |W| in
the column above a threshold) are kept in 16 bits and their q column is 0. The GEMMs run on
dequantised tiles (blocks of output rows forward, blocks of input columns backward) that stay
in cache: a full dequantised copy of W is never materialised.

Backends (one choice in :func:`linear_backend`, op key ``int8_linear``): ``cpu`` (tile dequant in
csrc/cpu/int8_linear.cpp + oneDNN GEMM per tile), ``triton`` (kernels/lora_linear.py: int8
dequant in the GEMM main loop, LoRA/outlier low-rank term in the epilogue), ``cuda``
(csrc/cuda/int8_linear.cu, same structure), ``torch`` (the same tiles dequantised by torch).
:func:`lora_linear_reference` (autograd on the fully dequantised fp32 weight) is the oracle.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastft import _backend

__all__ = ["Int8Saved", "Int8Weight", "LoRASaved", "dropout_mask", "int8_backward", "int8_linear",
           "int8_linear_bwd", "int8_linear_fwd", "linear_backend", "lora_backward", "lora_linear",
           "lora_linear_bwd", "lora_linear_fwd", "lora_linear_reference", "quantize_int8"]

# Output rows (forward) / input columns (backward) per dequantised tile. 512 rows x 2048 bf16 =
# 2 MiB. Measured (N=4096, in=out=2048, bf16, 2 threads): tile 512 = 1.00x the plain bf16 GEMM,
# 256 = 1.5x (oneDNN is less efficient on thin outputs), 1024 = 1.05x.
TILE = 512
# Rows of x per dropout-mask block: each block's mask comes from its own seeded generator, so the
# backward regenerates it block by block without ever holding the (N, in) mask.
MASK_ROWS = 1024


# ----------------------------------------------------------------------------------------------
# The int8 weight
# ----------------------------------------------------------------------------------------------
@dataclass
class Int8Weight:
    """A frozen 8-bit weight ``W ≈ qweight · scale[:, None]`` (+ 16-bit outlier columns).

    Attributes:
        qweight: (out, in) int8, contiguous; outlier columns hold 0.
        scale: (out,) fp32 or bf16, per output channel (absmax / 127).
        outlier_idx: (k,) int64 sorted input-column indices kept in 16 bits, or None.
        outlier_w: (out, k) bf16/fp16 values of those columns, or None.
    """

    qweight: Tensor
    scale: Tensor
    outlier_idx: Tensor | None = None
    outlier_w: Tensor | None = None

    def __post_init__(self):
        q, s = self.qweight, self.scale
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"Int8Weight.qweight: expected a 2-D int8 tensor, got {q.dim()}-D {q.dtype}")
        if s.dim() != 1 or s.shape[0] != q.shape[0] or s.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Int8Weight.scale: expected ({q.shape[0]},) fp32/bf16, got {tuple(s.shape)} {s.dtype}")
        if (self.outlier_idx is None) != (self.outlier_w is None):
            raise ValueError("Int8Weight: outlier_idx and outlier_w must both be given or both be None")
        if self.outlier_idx is not None:
            k = self.outlier_idx.numel()
            if self.outlier_w.shape != (q.shape[0], k):
                raise ValueError(f"Int8Weight.outlier_w: expected ({q.shape[0]}, {k}), got {tuple(self.outlier_w.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_idx is None else self.outlier_idx.numel()

    def nbytes(self) -> int:
        """Bytes held by the weight (int8 values, scales, outlier columns and their indices)."""
        ts = [self.qweight, self.scale, self.outlier_idx, self.outlier_w]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full (out, in) weight in ``dtype`` (fp32 maths). For references and merging only."""
        return self.dequantize_tile(0, self.shape[0], 0, self.shape[1], dtype)

    def dequantize_tile(self, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype) -> Tensor:
        """W[r0:r1, c0:c1] in ``dtype`` (contiguous), dequantised with torch ops in fp32."""
        w = self.qweight[r0:r1, c0:c1].float() * self.scale[r0:r1, None].float()
        if self.outlier_idx is not None and self.num_outliers:
            # the sorted indices in [c0, c1) found on a host copy: on a GPU a device-side test
            # would cost a host sync per tile (the CUDA default path dequantises tile by tile)
            host = self._host_outlier_idx()
            if host is not None:
                lo, hi = bisect.bisect_left(host, c0), bisect.bisect_left(host, c1)
                if hi > lo:
                    w[:, self.outlier_idx[lo:hi] - c0] = self.outlier_w[r0:r1, lo:hi].float()
            else:  # unsorted indices (not what quantize_int8 makes): the masked form
                sel = (self.outlier_idx >= c0) & (self.outlier_idx < c1)
                w[:, self.outlier_idx[sel] - c0] = self.outlier_w[r0:r1][:, sel].float()
        return w.to(dtype)

    def _host_outlier_idx(self) -> list[int] | None:
        """``outlier_idx`` as a Python list when sorted (else None), copied once per index tensor."""
        cached = self.__dict__.get("_host_idx")
        if cached is None or cached[0] is not self.outlier_idx:
            idx = self.outlier_idx.tolist()
            cached = (self.outlier_idx, idx if idx == sorted(idx) else None)
            self.__dict__["_host_idx"] = cached
        return cached[1]


def quantize_int8(W: Tensor, outlier_threshold: float | None = None,
                  scale_dtype: torch.dtype = torch.float32) -> Int8Weight:
    """Symmetric per-output-channel absmax quantisation of a (out, in) weight.

    Args:
        W: (out, in) float weight.
        outlier_threshold: input columns whose max |W| exceeds this stay in 16 bits (W's dtype if
            it is 16-bit, else fp16) and are excluded from the row absmax; None keeps none.
        scale_dtype: fp32 (default) or bf16 scales.
    Returns:
        Int8Weight with ``|W - dequantize()| <= scale / 2`` elementwise (outliers: 16-bit rounding).
    """
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"quantize_int8: expected a 2-D float weight (out, in), got "
                         f"{getattr(W, 'dim', lambda: '?')()}-D {getattr(W, 'dtype', type(W))}")
    Wf = W.detach().float()
    idx = ow = None
    if outlier_threshold is not None:
        cols = Wf.abs().amax(0) > outlier_threshold if Wf.shape[0] else torch.zeros(Wf.shape[1], dtype=torch.bool)
        if bool(cols.any()):
            idx = cols.nonzero().flatten().to(torch.int64)
            ow = Wf[:, idx].to(W.dtype if W.dtype in (torch.bfloat16, torch.float16) else torch.float16)
            Wf = Wf.clone()
            Wf[:, idx] = 0.0
    amax = Wf.abs().amax(1) if Wf.shape[1] else torch.zeros(Wf.shape[0], device=W.device)
    scale = (amax / 127.0).to(scale_dtype)
    # divide by the scale as stored (bf16 scales: the rounding of the scale is accounted for)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.round(Wf / safe[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
    return Int8Weight(q, scale, idx, ow)


# ----------------------------------------------------------------------------------------------
# Dropout mask (seeded per block of rows; shared by every backend and the tests)
# ----------------------------------------------------------------------------------------------
def _draw_seed() -> int:
    """One draw from torch's default CPU generator: checkpoint/resume restores it, so runs repeat."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


def _mask_block(seed: int, block: int, rows: int, cols: int, p: float, dtype, device) -> Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed + block)
    m = torch.empty(rows, cols, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=g)
    return m.mul_(1.0 / (1.0 - p))


def dropout_mask(seed: int, n: int, cols: int, p: float, dtype=torch.float32, device="cpu") -> Tensor:
    """The full (n, cols) mask (0 or 1/(1-p)) the op uses for ``seed``; for tests and references."""
    blocks = [_mask_block(seed, b, min(MASK_ROWS, n - r), cols, p, dtype, device)
              for b, r in enumerate(range(0, n, MASK_ROWS))]
    return torch.cat(blocks) if blocks else torch.empty(0, cols, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Reference (the oracle): autograd on the dequantised weight, fp32 maths
# ----------------------------------------------------------------------------------------------
def lora_linear_reference(x: Tensor, base, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                          dropout_mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """``x Wᵀ + bias + scaling · ((x ⊙ mask) Aᵀ) Bᵀ`` in fp32, returned in x's dtype.

    Args:
        x: (..., in). base: (out, in) float tensor or Int8Weight. lora_A: (r, in). lora_B: (out, r).
        dropout_mask: (N, in) with N = x.numel() // in (0 or 1/(1-p)), or None.
        bias: (out,) or None.
    """
    W = base.dequantize(torch.float32) if isinstance(base, Int8Weight) else base.float()
    xf = x.reshape(-1, x.shape[-1]).float()
    xd = xf if dropout_mask is None else xf * dropout_mask.float()
    y = xf @ W.T + scaling * ((xd @ lora_A.float().T) @ lora_B.float().T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], W.shape[0])


# ----------------------------------------------------------------------------------------------
# Base GEMMs (y = x Wᵀ and dX = dY W) on float or int8 weights, per backend
# ----------------------------------------------------------------------------------------------
def linear_backend(base, x2: Tensor, forced: str | None = None) -> str:
    """The backend that runs :func:`lora_linear_fwd` / :func:`int8_linear_fwd` for this weight and
    input (op key ``int8_linear``): the Triton/CUDA kernels take contiguous (out, in) weights and
    non-empty fp32/bf16/fp16 inputs; anything else on those devices runs the torch tiles.

    Args:
        base: (out, in) float weight or :class:`Int8Weight`.
        x2: (N, in) input.
        forced: backend name overriding ``FASTFT_BACKEND``.
    """
    be = _backend.choose_backend("int8_linear", x2.device, forced)
    if be in ("triton", "cuda"):
        w = base.qweight if isinstance(base, Int8Weight) else base
        if not (w.is_contiguous() and x2.dtype in (torch.float32, torch.bfloat16, torch.float16) and x2.numel() > 0):
            return "torch"
    return be


def _dequant_tile(base: Int8Weight, r0, r1, c0, c1, dtype, backend: str) -> Tensor:
    if backend == "cpu":
        return _cpu_dequant_tile(base, r0, r1, c0, c1, dtype)
    return base.dequantize_tile(r0, r1, c0, c1, dtype)


def _base_forward(x: Tensor, base, bias: Tensor | None, backend: str) -> Tensor:
    """y = x Wᵀ (+ bias): (N, out) in x's dtype."""
    if not isinstance(base, Int8Weight):
        return torch.addmm(bias, x, base.T) if bias is not None else x @ base.T
    out_f = base.shape[0]
    y = torch.empty(x.shape[0], out_f, dtype=x.dtype, device=x.device)
    if bias is not None:
        y.copy_(bias.expand_as(y))
    for o0 in range(0, out_f, TILE):  # tile = W[o0:o1, :] dequantised, (TILE, in), cache-resident
        o1 = min(o0 + TILE, out_f)
        tile = _dequant_tile(base, o0, o1, 0, base.shape[1], x.dtype, backend)
        y[:, o0:o1].addmm_(x, tile.T, beta=1 if bias is not None else 0)
    return y


def _base_backward(dy: Tensor, base, backend: str, acc: Tensor | None = None) -> Tensor:
    """dX = dY W: (N, in) in dY's dtype; with ``acc`` (N, in), acc += dY W in place (the GEMM's
    own accumulate: one rounding to dY's dtype, no (N, in) temporary) and returns acc."""
    if not isinstance(base, Int8Weight):
        return dy @ base if acc is None else acc.addmm_(dy, base)
    in_f = base.shape[1]
    dx = torch.empty(dy.shape[0], in_f, dtype=dy.dtype, device=dy.device) if acc is None else acc
    for c0 in range(0, in_f, TILE):  # tile = W[:, c0:c1] dequantised, (out, TILE)
        c1 = min(c0 + TILE, in_f)
        tile = _dequant_tile(base, 0, base.shape[0], c0, c1, dy.dtype, backend)
        dx[:, c0:c1].addmm_(dy, tile, beta=0 if acc is None else 1)
    return dx


def _cpu_dequant_tile(base: Int8Weight, r0, r1, c0, c1, dtype) -> Tensor:
    """W[r0:r1, c0:c1] in dtype via csrc/cpu/int8_linear.cpp (validated here: CPU, strides)."""
    q, sc = base.qweight, base.scale
    if q.device.type != "cpu" or q.stride(1) != 1 or not sc.is_contiguous() or dtype not in (torch.float32, torch.bfloat16):
        return base.dequantize_tile(r0, r1, c0, c1, dtype)
    out = torch.empty(r1 - r0, c1 - c0, dtype=dtype)
    k, idx_p, ow_p, ow_dt = 0, 0, 0, 0
    if base.num_outliers:
        idx, ow = base.outlier_idx.contiguous(), base.outlier_w.contiguous()
        k, idx_p, ow_dt = idx.numel(), idx.data_ptr(), _backend.DTYPE_CODES[ow.dtype]
        ow_p = ow.data_ptr() + r0 * k * ow.element_size()
    _backend.cpu_ext().int8_dequant_tile(
        q.data_ptr() + r0 * q.stride(0) + c0, q.stride(0), sc.data_ptr() + r0 * sc.element_size(),
        _backend.DTYPE_CODES[sc.dtype], out.data_ptr(), _backend.DTYPE_CODES[dtype], r1 - r0, c1 - c0,
        idx_p, k, ow_p, ow_dt, c0)
    return out


@_backend.on_input_device
def _mm(backend, a, b, b_strides, n, scale, scale_on_k, u, v, v_strides, bias) -> Tensor:
    """C = a @ deq(b) (+ bias) + u @ v on the device kernels (see kernels/lora_linear.py)."""
    if backend == "triton":
        from fastft.kernels.lora_linear import lora_mm

        return lora_mm(a, b, b_strides, n, scale, scale_on_k, u, v, v_strides, bias)
    ext = _backend.cuda_ext()
    M, K = a.shape
    c = torch.empty(M, n, dtype=a.dtype, device=a.device)
    dc = _backend.DTYPE_CODES
    ext.int8_lora_mm(a.data_ptr(), b.data_ptr(), b.dtype == torch.int8, b_strides[0], b_strides[1],
                     0 if scale is None else scale.data_ptr(), dc[scale.dtype] if scale is not None else 0,
                     scale_on_k, 0 if u is None else u.data_ptr(), 0 if u is None else u.shape[1],
                     0 if v is None else v.data_ptr(), v_strides[0], v_strides[1],
                     0 if bias is None else bias.data_ptr(), c.data_ptr(), M, n, K, dc[a.dtype],
                     torch.cuda.current_stream(a.device).cuda_stream)
    return c


def _device_forward(x, xd, base, Ar, Br, bias, scaling, backend):
    """y = x Wᵀ + bias + [x_outl, s·u] [W_outl, B]ᵀ in one kernel; returns (y, u = xd Aᵀ).
    Ar = Br = None: the base layer alone (outlier columns still go through the epilogue)."""
    is_q = isinstance(base, Int8Weight)
    u = U = V = None
    if Ar is not None:
        u = xd @ Ar.T  # (N, r)
        U, V = u * scaling, Br  # (N, r), (out, r)
    if is_q and base.num_outliers:  # 16-bit outlier columns join the epilogue's low-rank product
        xo, wo = x[:, base.outlier_idx], base.outlier_w.to(x.dtype)
        U = xo if U is None else torch.cat([xo, U], 1)
        V = wo if V is None else torch.cat([wo, V], 1)
    if V is not None:
        U, V = U.contiguous(), V.contiguous()
    b = base.qweight if is_q else base
    y = _mm(backend, x, b, (1, b.stride(0)), b.shape[0], base.scale if is_q else None, False,
            U, V, (1, V.stride(0)) if V is not None else (0, 0), bias)
    return y, u


def _device_backward_dx(dy, base, v, Ar, scaling, backend):
    """dX = dY deq(W) (+ s · v A in the epilogue when v is given); outlier columns added after."""
    is_q = isinstance(base, Int8Weight)
    b = base.qweight if is_q else base
    A = Ar.contiguous() if Ar is not None else None
    dx = _mm(backend, dy, b, (b.stride(0), 1), b.shape[1], base.scale if is_q else None, True,
             None if v is None else (v * scaling).contiguous(), A, (A.stride(0), 1) if A is not None else (0, 0),
             None)
    if is_q and base.num_outliers:  # (N, k) product on the k outlier columns only
        dx.index_add_(1, base.outlier_idx, dy @ base.outlier_w.to(dy.dtype))
    return dx


def _apply_dropout(x: Tensor, seed: int, p: float) -> Tensor:
    xd = torch.empty_like(x)
    for b, r in enumerate(range(0, x.shape[0], MASK_ROWS)):
        r1 = min(r + MASK_ROWS, x.shape[0])
        torch.mul(x[r:r1], _mask_block(seed, b, r1 - r, x.shape[1], p, x.dtype, x.device), out=xd[r:r1])
    return xd


def _add_masked_lora_dx(dx: Tensor, v: Tensor, A: Tensor, scaling: float, seed: int, p: float) -> None:
    """dx += scaling · (v A) ⊙ mask, one block of MASK_ROWS rows at a time (no (N, in) temporary)."""
    for b, r in enumerate(range(0, dx.shape[0], MASK_ROWS)):
        r1 = min(r + MASK_ROWS, dx.shape[0])
        t = v[r:r1] @ A
        t.mul_(_mask_block(seed, b, r1 - r, dx.shape[1], p, dx.dtype, dx.device))
        dx[r:r1].add_(t, alpha=scaling)


# ----------------------------------------------------------------------------------------------
# Forward/backward pairs (no autograd) and their autograd.Functions
# ----------------------------------------------------------------------------------------------
class LoRASaved(NamedTuple):
    """What :func:`lora_linear_fwd` keeps for :func:`lora_linear_bwd`."""

    xd: Tensor  # (N, in) drop(x) (x itself without dropout)
    u: Tensor  # (N, r) drop(x) Aᵀ
    A: Tensor  # (r, in) the LoRA parameter as given
    B: Tensor  # (out, r)
    base: object  # (out, in) float Tensor or Int8Weight
    scaling: float
    p: float  # dropout probability
    seed: int  # dropout mask seed (0 without dropout)
    backend: str


def lora_linear_fwd(x: Tensor, base, A: Tensor, B: Tensor, bias: Tensor | None, scaling: float, p: float,
                    backend: str) -> tuple[Tensor, LoRASaved]:
    """``y = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ`` without autograd (for callers building their own
    autograd node, with :func:`lora_linear_bwd`; :func:`lora_linear` is the checked, differentiable op).

    Args:
        x: (N, in) contiguous fp32/bf16/fp16.
        base: (out, in) float weight in x's dtype or an :class:`Int8Weight`.
        A: (r, in), B: (out, r): any float dtype (the maths runs in x's dtype).
        bias: (out,) in x's dtype or None.
        scaling: the LoRA scale; p: dropout probability on the LoRA branch.
        backend: from :func:`linear_backend`.
    Returns:
        (y, saved): y (N, out) in x's dtype.
    """
    seed = _draw_seed() if p > 0 else 0
    Ar, Br = A.to(x.dtype), B.to(x.dtype)
    xd = _apply_dropout(x, seed, p) if p > 0 else x
    if backend == "triton" or backend == "cuda":
        y, u = _device_forward(x, xd, base, Ar, Br, bias, scaling, backend)
    else:
        y = _base_forward(x, base, bias, backend)
        u = xd @ Ar.T  # (N, r)
        y.addmm_(u, Br.T, alpha=scaling)  # in place: no (N, out) temporary
    return y, LoRASaved(xd, u, A, B, base, scaling, p, seed, backend)


def lora_linear_bwd(saved: LoRASaved, dy: Tensor, need_x: bool = True, need_A: bool = True,
                    need_B: bool = True, need_bias: bool = False, acc: Tensor | None = None) -> tuple:
    """Gradients of :func:`lora_linear_fwd` for dY (N, out).

    With ``acc`` (N, in) the input gradient is added into it in place by the GEMM's accumulate
    (returned as dx), for a caller that sums input gradients without an (N, in) temporary.
    (fastft/models/fused_layer.py adds separately: see its ``_proj_bwd`` for the measured bf16 error.)

    Returns:
        (dx (N, in) in dY's dtype, dA (r, in) in A's dtype, dB (out, r) in B's dtype, dbias (out,)),
        each None when not asked for.
    """
    xd, u, A, B = saved.xd, saved.u, saved.A, saved.B
    base, s, p, seed, backend = saved.base, saved.scaling, saved.p, saved.seed, saved.backend
    dy = dy.contiguous()
    Ar, Br = A.to(dy.dtype), B.to(dy.dtype)
    dx = dA = dB = dbias = None
    v = dy @ Br if (need_x or need_A) else None  # (N, r)
    if need_x:
        if backend == "triton" or backend == "cuda":
            dx = _device_backward_dx(dy, base, v if p == 0 else None, Ar, s, backend)
            dx = dx if acc is None else acc.add_(dx)
        else:
            dx = _base_backward(dy, base, backend, acc)
            if p == 0:
                dx.addmm_(v, Ar, alpha=s)  # in place: no (N, in) temporary
        if p > 0:
            _add_masked_lora_dx(dx, v, Ar, s, seed, p)
    if need_A:
        dA = torch.mm(v.T, xd).mul_(s).to(A.dtype)  # (r, in)
    if need_B:
        dB = torch.mm(dy.T, u).mul_(s).to(B.dtype)  # (out, r)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dA, dB, dbias


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base_t, A, B, bias, base, scaling, p, backend):
        # base_t: W (float) or qweight, passed only so autograd sees the weight as an input
        y, s = lora_linear_fwd(x, base, A, B, bias, scaling, p, backend)
        ctx.save_for_backward(s.xd, s.u, s.A, s.B)
        ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.backend = base, scaling, p, s.seed, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        return lora_backward(ctx, dy)


def lora_backward(ctx, dy: Tensor, acc: Tensor | None = None) -> tuple:
    """:class:`_LoRALinearFn`'s gradients (one per forward input) for its ctx (a ``grad_fn``):
    :func:`lora_linear_bwd` on what the forward saved; ``acc`` as there."""
    xd, u, A, B = ctx.saved_tensors
    saved = LoRASaved(xd, u, A, B, ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.backend)
    need_x, _, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
    dx, dA, dB, dbias = lora_linear_bwd(saved, dy, need_x, need_A, need_B, need_bias, acc)
    return dx, None, dA, dB, dbias, None, None, None, None


class Int8Saved(NamedTuple):
    """What :func:`int8_linear_fwd` keeps for :func:`int8_linear_bwd`: the weight handle only."""

    base: object  # Int8Weight (or an (out, in) float weight)
    backend: str


def int8_linear_fwd(x: Tensor, base, bias: Tensor | None, backend: str) -> tuple[Tensor, Int8Saved]:
    """The frozen base alone, ``y = x deq(W)ᵀ + bias``, without autograd (see :func:`lora_linear_fwd`).

    Args:
        x: (N, in) contiguous; base: :class:`Int8Weight` (out, in); bias: (out,) in x's dtype or None.
        backend: from :func:`linear_backend`.
    Returns:
        (y, saved): y (N, out) in x's dtype.
    """
    if backend in ("triton", "cuda"):
        y, _ = _device_forward(x, x, base, None, None, bias, 0.0, backend)
    else:
        y = _base_forward(x, base, bias, backend)
    return y, Int8Saved(base, backend)


def int8_linear_bwd(saved: Int8Saved, dy: Tensor, need_x: bool = True, need_bias: bool = False,
                    acc: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`int8_linear_fwd` for dY (N, out): (dx (N, in), dbias (out,)), None where
    not asked for; ``acc`` as in :func:`lora_linear_bwd`."""
    dy = dy.contiguous()
    dx = dbias = None
    if need_x:
        if saved.backend in ("triton", "cuda"):
            dx = _device_backward_dx(dy, saved.base, None, None, 0.0, saved.backend)
            dx = dx if acc is None else acc.add_(dx)
        else:
            dx = _base_backward(dy, saved.base, saved.backend, acc)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dbias


class _Int8LinearFn(torch.autograd.Function):
    """The frozen int8 base alone: y = x deq(W)ᵀ + bias; saves nothing but the weight handle."""

    @staticmethod
    def forward(ctx, x, qweight, bias, base, backend):
        y, s = int8_linear_fwd(x, base, bias, backend)
        ctx.base, ctx.backend = s.base, s.backend
        return y

    @staticmethod
    def backward(ctx, dy):
        return int8_backward(ctx, dy)


def int8_backward(ctx, dy: Tensor, acc: Tensor | None = None) -> tuple:
    """:class:`_Int8LinearFn`'s gradients for its ctx (a ``grad_fn``); ``acc`` as in
    :func:`lora_linear_bwd`."""
    dx, dbias = int8_linear_bwd(Int8Saved(ctx.base, ctx.backend), dy, ctx.needs_input_grad[0],
                                ctx.needs_input_grad[2], acc)
    return dx, None, dbias, None, None


def int8_linear(x: Tensor, base: Int8Weight, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``y = x deq(W)ᵀ + bias`` for a frozen :class:`Int8Weight` (x: (..., in) -> (..., out)),
    tile by tile like :func:`lora_linear`; x and bias get gradients, W never."""
    out_f, in_f = base.shape
    if not x.is_floating_point() or x.shape[-1] != in_f:
        raise ValueError(f"int8_linear: x must be float (..., {in_f}), got {tuple(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, in_f).contiguous()
    be = linear_backend(base, x2, backend)
    bias_c = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    y = _Int8LinearFn.apply(x2, base.qweight, bias_c, base, be)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check(x: Tensor, base, A: Tensor, B: Tensor, bias: Tensor | None, dropout: float) -> tuple[int, int]:
    if isinstance(base, Int8Weight):
        out_f, in_f = base.shape
    elif isinstance(base, Tensor):
        if base.dim() != 2:
            raise ValueError(f"lora_linear: base weight must be 2-D (out, in), got shape {tuple(base.shape)}")
        if base.dtype != x.dtype:
            raise TypeError(f"lora_linear: base weight dtype {base.dtype} != x dtype {x.dtype}")
        out_f, in_f = base.shape
    else:
        raise TypeError(f"lora_linear: base must be a Tensor or Int8Weight, got {type(base).__name__}")
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"lora_linear: x must be float (..., {in_f}), got {tuple(x.shape)} {x.dtype}")
    if A.dim() != 2 or A.shape[1] != in_f or A.shape[0] < 1:
        raise ValueError(f"lora_linear: lora_A must be (r, {in_f}) with r >= 1, got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape != (out_f, A.shape[0]):
        raise ValueError(f"lora_linear: lora_B must be ({out_f}, {A.shape[0]}), got {tuple(B.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"lora_linear: bias must be ({out_f},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora_linear: dropout={dropout}: expected 0 <= dropout < 1")
    return out_f, in_f


def lora_linear(x: Tensor, base, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                dropout: float = 0.0, bias: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``y = x Wᵀ + bias + scaling · (dropout(x) Aᵀ) Bᵀ`` with a frozen base (see module docstring).

    Args:
        x: (..., in) fp32/bf16/fp16.
        base: (out, in) float weight in x's dtype, or an :class:`Int8Weight`. Never gets a grad.
        lora_A: (r, in), lora_B: (out, r): any float dtype (computed in x's dtype, grads in theirs).
        scaling: the LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: probability on the LoRA branch's input (training only: pass 0 in eval).
        bias: (out,) or None, frozen or trainable.
        backend: force a backend (else ``FASTFT_BACKEND`` / auto, op key ``int8_linear``).
    Returns:
        (..., out) in x's dtype.
    """
    out_f, in_f = _check(x, base, lora_A, lora_B, bias, dropout)
    x2 = x.reshape(-1, in_f)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    be = linear_backend(base, x2, backend)
    bias_c = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    base_t = base.qweight if isinstance(base, Int8Weight) else base
    y = _LoRALinearFn.apply(x2, base_t, lora_A, lora_B, bias_c, base, float(scaling), float(dropout), be)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


def int8_weight_bytes_ratio(base: Int8Weight) -> float:
    """Bytes of the int8 weight over the bytes of the same weight in fp32."""
    return base.nbytes() / (4 * math.prod(base.shape))
