"""Cross-entropy fused with the output head (``lm_head``): the (N, V) logits never exist.

Maths, per token i with target y (fp32 whatever the input dtype), eps = label_smoothing::

    x  = logit_scale * (hidden_i @ weight.T + bias)      (V,)   the GEMM, in the input dtype
    z  = softcap * tanh(x / softcap)   (or z = x)               logit soft-capping (Gemma 2/3)
    lse = logsumexp(z);  p = exp(z - lse)
    loss_i = lse - (1 - eps) * z_y - eps / V * sum(z) + z_loss * lse^2
    dloss_i/dz_j = p_j * (1 + 2 z_loss lse) - (1 - eps) [j == y] - eps / V

``logit_scale`` is Cohere's ``logit_scale`` and Granite's ``1 / logits_scaling``; it is applied
by scaling ``hidden`` (and ``bias``) before the op, ``(s h) W^T + s b = s (h W^T + b)``, so autograd
carries it into every gradient and the kernels never see it. The result is
``F.cross_entropy(z, y, label_smoothing=eps)`` plus the z-loss of PaLM
(Chowdhery et al. 2022, ``z_loss * log(Z)^2``). Tokens whose label is ``ignore_index`` have
zero loss and zero gradient; ``reduction="mean"`` divides by the number of other tokens
(0 tokens -> loss 0, not NaN).

How it runs (:class:`_FusedLinearCE`). The rows that have a target are gathered first, then per
chunk of ``chunk_size`` of them:
  1. one GEMM writes the chunk's logits into a reused (chunk, V) buffer (input dtype);
  2. one pass over the buffer (the backend: C++ on CPU, Triton or CUDA on GPU, PyTorch
     otherwise) computes max / sum-exp / loss / lse / argmax per row and overwrites the logits
     with dloss/dlogits, already multiplied by the reduction's scale;
  3. one GEMM writes dHidden for the chunk, and (when ``weight`` requires grad) one GEMM adds
     the chunk's dWeight into an fp32 accumulator; dBias is a column sum.
So the forward already holds every gradient, and backward only multiplies them by
``grad_output``. ``reduction="none"`` with a trainable weight/bias cannot do that (dWeight
depends on the per-token ``grad_output``), so then the forward computes the loss only and the
backward reruns the chunks with the per-token scales.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastft import _backend

__all__ = ["FusedCEOutput", "FusedLinearCrossEntropyLoss", "check_labels", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_reference", "default_chunk_size"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")

# Chunk buffer budget. The chunk's logits GEMM streams all of W (V x H) once per chunk, so
# larger chunks raise its arithmetic intensity (chunk/2 FLOP per byte of fp32 W) and cost memory
# linearly. Measured (benchmarks/sweep_ce_chunk.py, N=4096 H=576 V=49152, fwd+bwd, 2-core EPYC,
# quiet, results/ce_chunk_sweep.md), time relative to this budget's choice:
#   fp32: 128 rows 1.26x, 256 1.09x, 512 1.01x, 586 (this budget) 1.00, 1024 0.94x, 2048 0.90x
#   bf16: 128 rows 1.18x, 256 1.00x, 512 0.97x, 1024 (this budget) 1.00, 2048 0.99x
# so 128 MiB sits at the knee: bf16 gains nothing from more, fp32 gains 6-10% for 2-3.5x the
# buffer, which would put fastft's extra peak at or above the 10%-of-eager memory target
# (eager's extra peak is ~2.3 GB at that shape; fastft's 135 MB fp32 / 112 MB bf16).
CHUNK_BUDGET_BYTES = 128 << 20
_MIN_CHUNK, _MAX_CHUNK = 128, 2048
# dWeight of a 16-bit weight: the chunk's GEMM output is 16-bit, added into the fp32 accumulator
# V-slice by V-slice, so the 16-bit temporary stays at (_DW_SLICE, H).
_DW_SLICE = 8192


class FusedCEOutput(NamedTuple):
    """What :func:`fused_linear_cross_entropy` returns when ``return_z_loss`` or
    ``return_accuracy`` is set (otherwise it returns ``loss`` alone).

    loss: the loss with the requested reduction (z-loss included), differentiable.
    z_loss: the z-loss part of ``loss`` (same reduction), detached; None unless requested.
    accuracy: 0-dim fp32, fraction of non-ignored tokens whose argmax logit is the label
        (0 when every token is ignored), detached; None unless requested.
    """

    loss: Tensor
    z_loss: Tensor | None
    accuracy: Tensor | None


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk: the (chunk, V) buffer fits :data:`CHUNK_BUDGET_BYTES`, or N/8 rows when
    that is more, clamped to [128, 2048], then evened out so the last chunk is not a sliver.

    Why N/8: at N=4096 H=2048 V=128256 fp32 the budget alone gives 256 rows and 1.24x the two
    bare GEMMs' time, 512 rows 0.95x and 1024 rows 0.99x (one run each, quiet 2-core EPYC): a
    thin chunk re-streams the 1 GB weight 16 times. N/8 rows of logits stay under ~6% of eager's
    extra peak, which holds at least the (N, V) logits and their gradient."""
    elem = torch.tensor([], dtype=dtype).element_size()
    c = max(CHUNK_BUDGET_BYTES // max(1, vocab * elem), math.ceil(max(1, n_rows) / 8))
    c = max(_MIN_CHUNK, min(_MAX_CHUNK, int(c)))
    n = max(1, n_rows)
    chunks = math.ceil(n / c)
    return max(1, math.ceil(n / chunks))


# ----------------------------------------------------------------------------------------------
# Reference (fp32, F.linear + F.cross_entropy): the oracle
# ----------------------------------------------------------------------------------------------
def fused_linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor,
                                         bias: Tensor | None = None, *, ignore_index: int = -100,
                                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                                         softcap: float | None = None, logit_scale: float = 1.0,
                                         reduction: str = "mean",
                                         return_z_loss: bool = False, return_accuracy: bool = False):
    """The same op computed naively in fp32 (builds the full logits). Same arguments and
    returns as :func:`fused_linear_cross_entropy`; gradients flow through autograd."""
    _check_options(reduction, label_smoothing, z_loss, softcap, logit_scale)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).float()
    y = labels.reshape(-1)
    logits = F.linear(h, weight.float(), None if bias is None else bias.float())
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    valid = y != ignore_index
    zl = (z_loss * torch.logsumexp(logits, -1).square()) * valid
    per = ce + zl
    count = valid.sum()
    if reduction == "mean":
        loss, zterm = per.sum() / count.clamp_min(1), zl.sum() / count.clamp_min(1)
    elif reduction == "sum":
        loss, zterm = per.sum(), zl.sum()
    else:
        loss, zterm = per.reshape(labels.shape), zl.reshape(labels.shape)
    if not (return_z_loss or return_accuracy):
        return loss
    acc = ((logits.argmax(-1) == y) & valid).sum().float() / count.clamp_min(1)
    return FusedCEOutput(loss, zterm.detach() if return_z_loss else None,
                         acc.detach() if return_accuracy else None)


def _check_options(reduction, label_smoothing, z_loss, softcap, logit_scale=1.0):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(_REDUCTIONS)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a number in [0, 1]")
    if z_loss < 0:
        raise ValueError(f"z_loss={z_loss}: expected a non-negative number")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap}: expected a positive number or None")
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale={logit_scale}: expected a positive finite number")


# ----------------------------------------------------------------------------------------------
# The per-chunk pass: logits -> (loss, lse, argmax == label), logits overwritten by dlogits
# ----------------------------------------------------------------------------------------------
class _Opts(NamedTuple):
    smoothing: float
    z_loss: float
    softcap: float | None


def _chunk_pass_torch(buf: Tensor, y: Tensor, scale: Tensor, o: _Opts, write_grad: bool):
    """Pure-PyTorch pass (the fallback). buf: (C, V) logits, any float dtype, overwritten by
    the gradient when ``write_grad``; y: (C,) int64 in [0, V); scale: (C,) fp32.
    Returns loss (C,) fp32 (z-loss included), z-loss term (C,) fp32, correct (C,) bool."""
    V = buf.shape[1]
    x = buf.float()
    if o.softcap is not None:
        t = torch.tanh(x / o.softcap)
        z = o.softcap * t
    else:
        z = x
    lse = torch.logsumexp(z, -1)
    zy = z.gather(1, y[:, None]).squeeze(1)
    loss = lse - (1.0 - o.smoothing) * zy
    if o.smoothing:
        loss = loss - o.smoothing / V * z.sum(-1)
    zterm = o.z_loss * lse.square()
    loss = loss + zterm
    correct = z.argmax(-1) == y
    if write_grad:
        g = torch.exp(z - lse[:, None])
        g.mul_((scale * (1.0 + 2.0 * o.z_loss * lse))[:, None])
        if o.smoothing:
            g.sub_((scale * (o.smoothing / V))[:, None])
        g.scatter_add_(1, y[:, None], (-(1.0 - o.smoothing) * scale)[:, None])
        if o.softcap is not None:
            g.mul_(1.0 - t.square())
        buf.copy_(g)
    return loss, zterm, correct


def _chunk_pass_cpu(buf: Tensor, y: Tensor, scale: Tensor, o: _Opts, write_grad: bool):
    C, V = buf.shape
    loss = torch.empty(C, dtype=torch.float32)
    zterm = torch.empty(C, dtype=torch.float32)
    correct = torch.empty(C, dtype=torch.uint8)
    _backend.cpu_ext().cross_entropy_chunk(
        buf.data_ptr(), _backend.DTYPE_CODES[buf.dtype], C, V, buf.stride(0), y.data_ptr(),
        scale.data_ptr(), loss.data_ptr(), zterm.data_ptr(), correct.data_ptr(),
        float(o.smoothing), float(o.z_loss), float(o.softcap or 0.0), bool(write_grad))
    return loss, zterm, correct.bool()


def _chunk_pass_cuda(buf: Tensor, y: Tensor, scale: Tensor, o: _Opts, write_grad: bool):
    C, V = buf.shape
    loss = torch.empty(C, dtype=torch.float32, device=buf.device)
    zterm = torch.empty_like(loss)
    correct = torch.empty(C, dtype=torch.uint8, device=buf.device)
    _backend.cuda_ext().cross_entropy_chunk(
        buf.data_ptr(), _backend.DTYPE_CODES[buf.dtype], C, V, buf.stride(0), y.data_ptr(),
        scale.data_ptr(), loss.data_ptr(), zterm.data_ptr(), correct.data_ptr(),
        float(o.smoothing), float(o.z_loss), float(o.softcap or 0.0), bool(write_grad),
        torch.cuda.current_stream(buf.device).cuda_stream)
    return loss, zterm, correct.bool()


def _chunk_pass_triton(buf: Tensor, y: Tensor, scale: Tensor, o: _Opts, write_grad: bool):
    from fastft.kernels.fused_linear_cross_entropy import cross_entropy_chunk_triton

    return cross_entropy_chunk_triton(buf, y, scale, o.smoothing, o.z_loss, o.softcap, write_grad)


_PASSES = {"torch": _chunk_pass_torch, "cpu": _chunk_pass_cpu, "cuda": _chunk_pass_cuda,
           "triton": _chunk_pass_triton}


# ----------------------------------------------------------------------------------------------
# The chunk loop
# ----------------------------------------------------------------------------------------------
@_backend.on_input_device
def _run_chunks(h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, row_scale: Tensor,
                o: _Opts, backend: str, chunk: int, need_dh: bool, need_dw: bool, need_db: bool):
    """h: (M, H) rows with a target (input dtype); y: (M,) int64; row_scale: (M,) fp32.
    Returns loss (M,), zterm (M,), correct (M,) bool, dh (M, H) or None, dw (V, H) fp32 or None,
    db (V,) fp32 or None."""
    M, H = h.shape
    V = weight.shape[0]
    dev, dt = h.device, h.dtype
    write_grad = need_dh or need_dw or need_db
    loss = torch.empty(M, dtype=torch.float32, device=dev)
    zterm = torch.empty(M, dtype=torch.float32, device=dev)
    correct = torch.empty(M, dtype=torch.bool, device=dev)
    dh = torch.empty(M, H, dtype=dt, device=dev) if need_dh else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_db else None
    if M == 0:
        return loss, zterm, correct, dh, dw, db
    buf_all = torch.empty(min(chunk, M), V, dtype=dt, device=dev)
    wt = weight.t()
    bias_c = None if bias is None else bias.to(dt)
    pass_fn = _PASSES[backend]
    for r0 in range(0, M, chunk):
        r1 = min(M, r0 + chunk)
        hc = h[r0:r1]
        buf = buf_all[: r1 - r0]
        if bias_c is None:
            torch.mm(hc, wt, out=buf)
        else:
            torch.addmm(bias_c, hc, wt, out=buf)
        lc, zc, cc = pass_fn(buf, y[r0:r1], row_scale[r0:r1], o, write_grad)
        loss[r0:r1], zterm[r0:r1], correct[r0:r1] = lc, zc, cc
        if need_dh:
            torch.mm(buf, weight, out=dh[r0:r1])
        if need_dw:
            if dt == torch.float32:
                dw.addmm_(buf.t(), hc)
            else:  # no 16-bit x 16-bit -> fp32 GEMM on CPU: 16-bit partial per V-slice
                for v0 in range(0, V, _DW_SLICE):
                    v1 = min(V, v0 + _DW_SLICE)
                    dw[v0:v1].add_(torch.mm(buf[:, v0:v1].t(), hc))
        if need_db:
            db.add_(buf.sum(0, dtype=torch.float32))
    return loss, zterm, correct, dh, dw, db


def _prepare(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
             ignore_index: int):
    """Validates and flattens; returns (h2d, y, idx or None, n_valid tensor, N, row mask or None).

    On the CPU ignored rows are gathered out (``idx``: the kept rows) and bad labels raise; on
    GPUs (:func:`_sync_free`) every row stays, ``y`` holds 0 at ignored/bad rows and the row mask
    (N,) fp32 is 1 / 0 / NaN for valid / ignored / bad rows."""
    if not isinstance(hidden, Tensor) or hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor of shape (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (V, {hidden.shape[-1]}) to match hidden (..., H), "
                         f"got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dim), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if hidden.dtype not in _DTYPES or not (weight.dtype == hidden.dtype or weight.dtype == torch.float32):
        raise TypeError(f"hidden/weight: expected the same dtype among fp32/bf16/fp16 (or an fp32 weight "
                        f"with 16-bit hidden), got {hidden.dtype} and {weight.dtype}")
    V = weight.shape[0]
    if bias is not None and (bias.shape != (V,) or bias.dtype not in _DTYPES):
        raise ValueError(f"bias: expected a float tensor of shape ({V},), got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    devs = {hidden.device, weight.device, labels.device} | ({bias.device} if bias is not None else set())
    if len(devs) != 1:
        raise ValueError(f"hidden/weight/labels/bias: expected one device, got {sorted(map(str, devs))}")
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    if h.stride(-1) != 1:
        h = h.contiguous()
    y = labels.reshape(-1).to(torch.int64)
    valid = y != ignore_index
    N = h.shape[0]
    if not _sync_free(y.device):
        bad = valid & ((y < 0) | (y >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels: value {int(y[i])} at flat position {i} is outside [0, {V}) "
                             f"and is not ignore_index={ignore_index}")
        n_valid = valid.sum()
        idx = None
        if not bool(valid.all()):
            idx = valid.nonzero().squeeze(1)
            h = h.index_select(0, idx)
            y = y.index_select(0, idx)
        return h, y.contiguous(), idx, n_valid, N, None
    # GPU: no host sync. Every row goes through the chunks; ignored rows run with label 0 and a zero
    # scale (zero gradient, loss masked to 0), and out-of-range labels are recorded in a device
    # flag (check_labels raises) and give NaN loss and gradient rows (FusedAdamW then skips the
    # step). A host-side gather would need the count of valid rows (one sync per call).
    bad = valid & ((y < 0) | (y >= V))
    _record_bad_labels(bad, y, V, ignore_index)
    ok = valid & ~bad
    mask = ok.to(torch.float32).masked_fill_(bad, float("nan"))  # 1 valid, 0 ignored, NaN bad
    return h, torch.where(ok, y, 0), None, valid.sum(), N, mask


def _sync_free(device: torch.device) -> bool:
    """Whether labels are checked and filtered without a host sync (every device but the CPU,
    where reading a tensor costs nothing and ignored rows are dropped before the GEMMs)."""
    return device.type != "cpu"


# device -> (flag: 0-dim bool, value: 0-dim int64 of the largest-magnitude bad label, vocab)
_BAD_LABELS: dict[torch.device, tuple[Tensor, Tensor, int, int]] = {}


def _record_bad_labels(bad: Tensor, y: Tensor, V: int, ignore_index: int) -> None:
    """Fold "some label is outside [0, V)" into a per-device flag: a few device ops, no sync."""
    dev = y.device
    if dev not in _BAD_LABELS:
        _BAD_LABELS[dev] = (torch.zeros((), dtype=torch.bool, device=dev),
                            torch.zeros((), dtype=torch.int64, device=dev), V, ignore_index)
    flag, value, _, _ = _BAD_LABELS[dev]
    if bad.numel():
        flag.logical_or_(bad.any())
        value.copy_(torch.maximum(value, torch.where(bad, y, 0).abs().max()))
    _BAD_LABELS[dev] = (flag, value, V, ignore_index)


def check_labels() -> None:
    """Raise if any call on a GPU since the last check had a label outside [0, V) that was not
    ``ignore_index``. Those calls returned NaN losses (and NaN gradient rows) instead of failing
    at once, because checking there would cost a host sync per call; the trainer calls this where
    it reads the loss anyway. One sync per device with a recorded flag; a no-op otherwise.

    Raises:
        ValueError: naming the device, the offending value (largest magnitude) and V.
    """
    for dev, (flag, value, V, ignore_index) in list(_BAD_LABELS.items()):
        if bool(flag):
            v = int(value)
            flag.zero_()
            value.zero_()
            raise ValueError(f"labels: a value outside [0, {V}) that is not ignore_index={ignore_index} "
                             f"reached fused_linear_cross_entropy on {dev} (e.g. {v}, or -{v}); its "
                             f"loss and gradient are NaN")


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, opts, reduction, chunk, backend, grad_to=None):
        h, y, idx, n_valid, N, row_mask = _prepare(hidden, weight, labels, bias, ignore_index)
        # fp32 weight with 16-bit hidden (fastft's fp32 tied embedding, fastft/train/precision.py): the
        # GEMMs run in the hidden dtype on a copy rounded once per call, as autocast would; dWeight
        # still accumulates in fp32 and is returned in fp32 (ctx.w_dtype).
        w_run = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        M = h.shape[0]
        need_dh = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        deferred = reduction == "none" and (need_dw or need_db)
        if reduction == "mean":
            s = 1.0 / n_valid.clamp_min(1).to(torch.float32)
            row_scale = s.expand(M).contiguous()
        else:
            row_scale = torch.ones(M, dtype=torch.float32, device=h.device)
        if row_mask is not None:  # GPU: ignored rows get no gradient, bad rows a NaN one
            row_scale = row_scale * row_mask
        chunk = chunk or default_chunk_size(M, weight.shape[0], h.dtype)
        loss_r, z_r, cor_r, dh, dw, db = _run_chunks(
            h, w_run, bias, y, row_scale, opts, backend, chunk,
            need_dh and not deferred, need_dw and not deferred, need_db and not deferred)
        if row_mask is not None:  # ignored rows -> 0 (whatever their label-0 loss), bad rows -> NaN
            loss_r = torch.where(row_mask == 0, 0.0, loss_r * row_mask)
            z_r = torch.where(row_mask == 0, 0.0, z_r * row_mask)
            cor_r = cor_r & (row_mask == 1)
        dev = h.device
        if reduction == "none":
            loss = torch.zeros(N, dtype=torch.float32, device=dev)
            zt = torch.zeros(N, dtype=torch.float32, device=dev)
            if idx is None:
                loss, zt = loss_r, z_r
            else:
                loss.index_copy_(0, idx, loss_r)
                zt.index_copy_(0, idx, z_r)
            loss, zt = loss.reshape(labels.shape), zt.reshape(labels.shape)
        else:
            denom = n_valid.clamp_min(1).to(torch.float32) if reduction == "mean" else 1.0
            loss, zt = loss_r.sum() / denom, z_r.sum() / denom
        acc = cor_r.sum().to(torch.float32) / n_valid.clamp_min(1).to(torch.float32)
        ctx.reduction, ctx.deferred, ctx.idx, ctx.N = reduction, deferred, idx, N
        ctx.row_mask = row_mask if deferred else None
        ctx.hidden_shape, ctx.w_dtype = hidden.shape, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.opts, ctx.chunk, ctx.backend, ctx.grad_to = opts, chunk, backend, grad_to
        if deferred:
            ctx.save_for_backward(h, w_run, bias, y)
        else:
            ctx.grads = (dh, dw, db)
        ctx.mark_non_differentiable(zt, acc)
        return loss, zt, acc

    @staticmethod
    def backward(ctx, g_loss, _g_z, _g_acc):
        if ctx.deferred:
            h, weight, bias, y = ctx.saved_tensors
            g = g_loss.reshape(-1).float()
            if ctx.idx is not None:
                g = g.index_select(0, ctx.idx)
            if ctx.row_mask is not None:
                g = g * ctx.row_mask
            _, _, _, dh, dw, db = _run_chunks(
                h, weight, bias, y, g.contiguous(), ctx.opts, ctx.backend, ctx.chunk,
                ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
            scale_rows = None
            g_scalar = None
        else:
            dh, dw, db = ctx.grads
            ctx.grads = None  # a second backward (retain_graph) must not reuse scaled buffers
            if ctx.reduction == "none":
                scale_rows = g_loss.reshape(-1).to(torch.float32)
                if ctx.idx is not None:
                    scale_rows = scale_rows.index_select(0, ctx.idx)
                g_scalar = None
            else:
                scale_rows = None
                g_scalar = g_loss.to(torch.float32)
        grad_h = grad_w = grad_b = None
        if dh is not None:
            if scale_rows is not None:
                dh = (dh.float() * scale_rows[:, None]).to(dh.dtype)
            elif g_scalar is not None and not _is_one(g_scalar):
                dh = (dh.float() * g_scalar).to(dh.dtype)
            if ctx.idx is not None:
                full = torch.zeros(ctx.N, dh.shape[1], dtype=dh.dtype, device=dh.device)
                full.index_copy_(0, ctx.idx, dh)
                dh = full
            grad_h = dh.reshape(ctx.hidden_shape)
        if dw is not None:
            if g_scalar is not None and not _is_one(g_scalar):
                dw.mul_(g_scalar)
            grad_w = dw.to(ctx.w_dtype)
            dw = None
            if ctx.grad_to is not None:  # tied embedding (fastft/ops/tied_embedding.py) adds into it and returns it
                ctx.grad_to.grad, grad_w = grad_w, None
        if db is not None:
            if g_scalar is not None and not _is_one(g_scalar):
                db.mul_(g_scalar)
            grad_b = db.to(ctx.b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _is_one(g: Tensor) -> bool:
    # On CPU the check is free and saves a pass over dWeight (1 GB at V=128256, H=2048).
    return g.device.type == "cpu" and bool(g == 1.0)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor,
                               bias: Tensor | None = None, *, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None, logit_scale: float = 1.0,
                               reduction: str = "mean",
                               chunk_size: int | None = None, return_z_loss: bool = False,
                               return_accuracy: bool = False, backend: str | None = None,
                               weight_grad_to=None):
    """``F.cross_entropy(F.linear(hidden, weight, bias), labels)`` without the (N, V) logits.

    Args:
        hidden: (..., H) fp32/bf16/fp16, any strides (e.g. the last hidden states (B, T, H)).
        weight: (V, H) same dtype, or fp32 with 16-bit hidden (rounded to hidden's dtype for the
            GEMMs; its gradient is accumulated and returned in fp32). The output head / tied embedding.
        labels: (...) integer token ids in [0, V) or ``ignore_index``; shape of hidden[..., 0].
        bias: (V,) or None.
        ignore_index: label value that contributes nothing.
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        z_loss: coefficient of ``logsumexp(logits)^2`` added to each token's loss.
        softcap: logits become ``softcap * tanh(logits / softcap)`` before the softmax.
        logit_scale: logits are multiplied by this (before the soft-cap); Cohere's
            ``logit_scale``, Granite's ``1 / logits_scaling``.
        reduction: "mean" (over non-ignored tokens; 0 when there are none), "sum" or "none"
            (shape of ``labels``, 0 at ignored tokens).
        chunk_size: rows per chunk; default :func:`default_chunk_size`.
        return_z_loss, return_accuracy: return a :class:`FusedCEOutput` instead of the loss.
        backend: force a backend ("cpu", "triton", "cuda", "torch"); default
            ``fastft._backend.choose_backend("cross_entropy", device)``.
        weight_grad_to: a :class:`fastft.ops.tied_embedding.TiedGrad`: ``weight``'s gradient is
            handed to it instead of returned, for the tied embedding's backward of the same forward
            to add into (:func:`fastft.ops.tied_embedding.tied_embedding`); that backward must run.
    Returns:
        The fp32 loss (0-dim, or ``labels.shape`` for "none"), or a :class:`FusedCEOutput`.
    Raises:
        ValueError/TypeError on bad shapes, dtypes, options or (on CPU) out-of-range labels. On a
        GPU an out-of-range label gives a NaN loss at once and a ValueError from
        :func:`check_labels` (no host sync in the call).
    """
    _check_options(reduction, label_smoothing, z_loss, softcap, logit_scale)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: expected a positive integer or None")
    if logit_scale != 1.0:
        # s * (h W^T + b) == (s h) W^T + s b: one (..., H) multiply instead of a new kernel path;
        # autograd gives dh = s * dh' and dW = dlogits^T (s h), both exact.
        hidden = hidden * logit_scale
        bias = None if bias is None else bias * logit_scale
    be = _backend.choose_backend("cross_entropy", hidden.device, backend)
    opts = _Opts(float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
    loss, zt, acc = _FusedLinearCE.apply(hidden, weight, bias, labels, int(ignore_index), opts,
                                         reduction, chunk_size, be, weight_grad_to)
    if not (return_z_loss or return_accuracy):
        return loss
    return FusedCEOutput(loss, zt if return_z_loss else None, acc if return_accuracy else None)


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form: ``loss = FusedLinearCrossEntropyLoss()(hidden, lm_head.weight, labels)``.

    Holds the options of :func:`fused_linear_cross_entropy`; ``forward(hidden, weight, labels,
    bias=None)`` with the same shapes. With ``return_z_loss``/``return_accuracy`` it returns a
    :class:`FusedCEOutput`.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, reduction: str = "mean", chunk_size: int | None = None,
                 return_z_loss: bool = False, return_accuracy: bool = False):
        super().__init__()
        _check_options(reduction, label_smoothing, z_loss, softcap)
        self.kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                       softcap=softcap, reduction=reduction, chunk_size=chunk_size,
                       return_z_loss=return_z_loss, return_accuracy=return_accuracy)

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None):
        return fused_linear_cross_entropy(hidden, weight, labels, bias, **self.kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.kw.items())
