"""Fused RMSNorm / SwiGLU / RoPE vs their fp32 references: outputs and every gradient.

Each backend available here runs (cpu C++, triton under TRITON_INTERPRET=1 with small shapes,
torch). Two checks per case:
* against the reference at the same dtype (same roundings as HF): fp32 to ~1e-5, 16-bit to one
  unit in the last place of the output dtype;
* against the fp32 truth (reference on fp32 copies of the inputs): the kernel's max error must be
  at most 2x eager PyTorch's own error at that dtype (HF's formula run in bf16/fp16, measured
  here) plus a tiny floor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastft import _backend
from fastft.ops.rms_norm import rms_norm, rms_norm_reference
from fastft.ops.rope import rope, rope_reference
from fastft.ops.swiglu import swiglu, swiglu_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# relative tolerance against the same-dtype reference: fp32 reassociation, one 16-bit ulp
SAME_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
ROWS_SHAPES = ((37, 1003), (1, 7), (0, 64), (2, 3, 129))
TRITON_ROWS_SHAPES = ((37, 103), (1, 7), (0, 64), (2, 3, 29))  # the interpreter is slow


def _backends(op):
    return [b for b in ("cpu", "triton", "torch") if b in _backend.available_backends(op, "cpu")]


def _shapes(backend):
    return TRITON_ROWS_SHAPES if backend == "triton" else ROWS_SHAPES


def _run(fn, inputs, grads_out):
    """Outputs and input grads of fn(*inputs) (inputs are leaf copies)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, leaves, grads_out, allow_unused=False)
    return [o.detach() for o in outs], list(grads)


def _maxerr(a, b):
    return 0.0 if a.numel() == 0 else (a.float() - b.float()).abs().max().item()


def _compare(name, dtype, ours, same, truth, eager):
    """ours/same/truth/eager: lists of tensors (outputs then grads) in the same order."""
    for i, (o, s, t, e) in enumerate(zip(ours, same, truth, eager)):
        what = f"{name} tensor {i} ({dtype})"
        assert o.dtype == s.dtype and o.shape == s.shape, what
        if o.numel() == 0:
            continue
        scale = t.float().abs().max().item()
        torch.testing.assert_close(o.float(), s.float(), rtol=SAME_RTOL[dtype],
                                   atol=SAME_RTOL[dtype] * max(scale, 1e-30), msg=what)
        if dtype != torch.float32:
            ours_err, eager_err = _maxerr(o, t), _maxerr(e, t)
            assert ours_err <= 2 * eager_err + 1e-6 * scale, \
                f"{what}: error {ours_err:.3g} vs fp32 > 2x eager PyTorch's {eager_err:.3g}"


def _check_op(name, fused, reference, eager, inputs, grads_out, dtype):
    ours = _run(fused, inputs, grads_out)
    same = _run(reference, inputs, grads_out)
    truth = _run(reference, [x.float() for x in inputs], [g.float() for g in grads_out])
    eag = _run(eager, inputs, grads_out)
    _compare(name, dtype, ours[0] + ours[1], same[0] + same[1], truth[0] + truth[1], eag[0] + eag[1])


# ------------------------------------------------------------------------------------------------
def _hf_rms(x, w, eps=1e-6):  # transformers' LlamaRMSNorm.forward, in the input dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("backend", _backends("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(backend, dtype):
    for shape in _shapes(backend):
        x = (torch.randn(shape) * 3 + 0.5).to(dtype)
        w = (1 + 0.2 * torch.randn(shape[-1])).to(dtype)
        dy = torch.randn(shape).to(dtype)
        _check_op(f"rms_norm{shape}", lambda a, b: rms_norm(a, b, 1e-6, forced=backend),
                  lambda a, b: rms_norm_reference(a, b, 1e-6), _hf_rms, [x, w], [dy], dtype)


@pytest.mark.parametrize("backend", _backends("rms_norm"))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_rms_norm_fp32_weight(backend, dtype):
    """fp32 weight with 16-bit x (fastft/train/precision.py): y in x's dtype, dweight fp32, the same
    values as HF's module under autocast (fp32 result rounded to x's dtype by the next matmul)."""
    for shape in _shapes(backend):
        x = (torch.randn(shape) * 3 + 0.5).to(dtype)
        # a weight off the 16-bit grid: the kernels must not round it
        w = 1 + 0.2 * torch.randn(shape[-1]) + 1e-4 * torch.rand(shape[-1])
        dy = torch.randn(shape).to(dtype)
        fused = lambda a, b: rms_norm(a, b, 1e-6, forced=backend)  # noqa: E731
        _check_op(f"rms_norm_w32{shape}", fused,
                  lambda a, b: rms_norm_reference(a, b, 1e-6).to(a.dtype),
                  lambda a, b: _hf_rms(a, b).to(a.dtype), [x, w], [dy], dtype)
        (y,), (_, dw) = _run(fused, [x, w], [dy])
        assert y.dtype == dtype and dw.dtype == torch.float32
    # a change of the fp32 weight below 16-bit resolution still moves the output
    x = torch.randn(64, 96).to(dtype)
    w = torch.ones(96)
    y0 = rms_norm(x, w, forced=backend).float()
    y1 = rms_norm(x, w + 2e-3, forced=backend).float()  # bf16 spacing at 1.0 is 7.8e-3
    assert (y0 != y1).any()


def test_rms_norm_mixed_dtypes_and_errors():
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    w = torch.randn(16)  # fp32 weight, bf16 x: x's dtype out (autocast's values, see above)
    y = rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _hf_rms(x, w).to(torch.bfloat16), rtol=0, atol=0)
    w16 = torch.randn(16, dtype=torch.float16)  # other mixes: the reference, HF's promoted dtype
    y = rms_norm(x, w16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, _hf_rms(x, w16), rtol=1e-6, atol=1e-6)
    if "cpu" in _backends("rms_norm"):
        with pytest.raises(ValueError, match="weight dtype code"):
            _backend.cpu_ext().rms_norm_fwd(x.data_ptr(), w16.data_ptr(), x.data_ptr(), 0, 0, 16, 1e-6, 1, 2)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, torch.ones(15, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends("swiglu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu(backend, dtype):
    for shape in _shapes(backend):
        g = (torch.randn(shape) * 4).to(dtype)  # covers the saturated tails of sigmoid
        u = torch.randn(shape).to(dtype)
        dy = torch.randn(shape).to(dtype)
        _check_op(f"swiglu{shape}", lambda a, b: swiglu(a, b, forced=backend), swiglu_reference,
                  lambda a, b: F.silu(a) * b, [g, u], [dy], dtype)


def test_swiglu_extremes_and_saved_tensors():
    if "cpu" not in _backends("swiglu"):
        pytest.skip("fastft._C not built")
    g = torch.tensor([-1e4, -100.0, -88.0, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0, 1e4])
    u = torch.ones_like(g)
    torch.testing.assert_close(swiglu(g, u, forced="cpu"), F.silu(g), rtol=2e-7, atol=1e-30)
    # the backward recomputes silu: only gate and up are saved (eager saves silu(gate) too)
    saved = []
    gg, uu = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gg, uu, forced="cpu")
    assert len(saved) == 2
    with pytest.raises(ValueError, match="equal shapes"):
        swiglu(torch.ones(2, 3), torch.ones(3, 2))


# ------------------------------------------------------------------------------------------------
def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _hf_rope(q, k, cos, sin, unsqueeze_dim=1):  # transformers' apply_rotary_pos_emb
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rope_table(b, t, d, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(t).float()[:, None] * inv[None]
    emb = torch.cat((ang, ang), -1)[None].expand(b, t, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


ROPE_CASES = ((2, 9, 3, 17, 64, 1), (1, 3, 1, 5, 8, 1), (2, 4, 2, 7, 16, 2), (1, 2, 2, 0, 8, 1))


@pytest.mark.parametrize("backend", _backends("rope"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope(backend, dtype):
    for b, hq, hk, t, d, udim in ROPE_CASES:
        if backend == "triton" and d > 16:
            d = 16
        # HF layout: projections viewed (B, T, H, D) then transposed to (B, H, T, D)
        q = torch.randn(b, t, hq, d).to(dtype)
        k = torch.randn(b, t, hk, d).to(dtype)
        if udim == 1:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = _rope_table(1 if b == 1 else b, t, d, dtype)
        dq, dk = torch.randn(q.shape).to(dtype), torch.randn(k.shape).to(dtype)
        # keep the transposed layouts of q/k (the leaf copies in _run preserve strides)
        _check_op(f"rope{(b, hq, hk, t, d, udim)}",
                  lambda x, y, c=cos, s=sin, u=udim: rope(x, y, c, s, u, forced=backend),
                  lambda x, y, c=cos, s=sin, u=udim: rope_reference(x, y, c, s, u),
                  lambda x, y, c=cos, s=sin, u=udim: _hf_rope(x, y, c, s, u), [q, k], [dq, dk], dtype)


@pytest.mark.parametrize("backend", [b for b in _backends("rope") if b != "torch"])
def test_rope_layout_and_general_tables(backend):
    # output keeps q's memory layout (what SDPA sees unpatched); cos/sin with distinct halves and
    # a per-batch table: the backward is the exact transpose, not a sin-negated forward
    q = torch.randn(2, 6, 3, 8).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 3, 6, 8).requires_grad_()  # contiguous (B, H, T, D)
    cos, sin = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    ours = rope(q, k, cos, sin, forced=backend)
    assert ours[0].stride() == q.stride() and ours[1].stride() == k.stride()
    ref = rope_reference(q, k, cos, sin)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)
    a = torch.autograd.grad(ours, (q, k), (gq, gk))
    b = torch.autograd.grad(ref, (q, k), (gq, gk))
    for x, y in zip(list(ours) + list(a), list(ref) + list(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # cos/sin that need a gradient run the reference (the kernels do not produce one)
    c = cos.clone().requires_grad_()
    out = rope(q, k, c, sin, forced=backend)
    (out[0].sum() + out[1].sum()).backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
