"""fused_linear_cross_entropy vs its fp32 reference (F.linear + F.cross_entropy), every backend
available here (cpu C++, triton under TRITON_INTERPRET=1 with small shapes, torch chunked):
loss, dHidden, dWeight and dBias, every option, fp32/bf16/fp16, edge cases.

fp32 must match to ~1e-5 relative. 16-bit inputs: the error of each output against the fp32
reference (computed from the same 16-bit inputs) must be at most 2x PyTorch's own error when it
runs the same F.linear + F.cross_entropy in that dtype, plus a small floor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastft import _backend
from fastft.ops.fused_linear_cross_entropy import (FusedCEOutput, FusedLinearCrossEntropyLoss,
                                                   default_chunk_size, fused_linear_cross_entropy,
                                                   fused_linear_cross_entropy_reference)

BACKENDS = [b for b in ("cpu", "triton", "torch")
            if b in _backend.available_backends("cross_entropy", "cpu")]
OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=4.0),
    dict(label_smoothing=0.05, z_loss=1e-2, softcap=3.0, reduction="sum"),
    dict(reduction="none", z_loss=1e-3),
    dict(logit_scale=0.0625),                        # Cohere's logit_scale
    dict(logit_scale=1 / 3.0, softcap=2.5, reduction="sum"),  # scale, then cap
    dict(logit_scale=2.5, reduction="none"),
]


def _problem(N, H, V, dtype, bias=False, ignore_every=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H ** -0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, b, y


def _grads(fn, h, w, b, y, gseed=1, **kw):
    out = fn(h, w, y, b, **kw)
    loss = out.loss if isinstance(out, FusedCEOutput) else out
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(gseed)) if loss.dim() else \
        torch.tensor(0.7)
    params = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, params, go)
    return out, [loss] + list(grads)


def _ref32(h, w, b, y, **kw):
    """fp32 reference on fp32 copies of the (possibly 16-bit) inputs."""
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    b32 = None if b is None else b.detach().float().requires_grad_()
    return _grads(fused_linear_cross_entropy_reference, h32, w32, b32, y, **kw)


def _max_err(a, b):
    return (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0


def _assert_fp32(got, ref, rtol=2e-5):
    for i, (a, r) in enumerate(zip(got, ref)):
        scale = r.detach().abs().max().item() if r.numel() else 0.0
        err = _max_err(a, r)
        assert err <= rtol * max(scale, 1e-3), f"output {i}: max err {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_matches_reference(backend, opts, bias):
    N, H, V = (37, 67, 1003) if backend != "triton" else (11, 19, 203)
    h, w, b, y = _problem(N, H, V, torch.float32, bias=bias)
    _, got = _grads(fused_linear_cross_entropy, h, w, b, y, backend=backend, chunk_size=8, **opts)
    _, ref = _ref32(h, w, b, y, **opts)
    _assert_fp32(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)],
                         ids=["plain", "all"])
def test_16bit_within_2x_of_torch(backend, dtype, opts):
    N, H, V = (64, 96, 1003) if backend != "triton" else (12, 32, 203)
    h, w, b, y = _problem(N, H, V, dtype, bias=True)
    _, got = _grads(fused_linear_cross_entropy, h, w, b, y, backend=backend, chunk_size=16, **opts)
    _, ref = _ref32(h, w, b, y, **opts)

    def torch_16bit(h_, w_, y_, b_, label_smoothing=0.0, z_loss=0.0, softcap=None):
        logits = F.linear(h_, w_, b_)  # PyTorch's own 16-bit path (logits in the dtype)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        ce = F.cross_entropy(logits, y_, label_smoothing=label_smoothing, reduction="none")
        valid = y_ != -100
        zl = z_loss * torch.logsumexp(logits, -1).square() * valid
        return (ce + zl).sum() / valid.sum()

    _, base = _grads(torch_16bit, h, w, b, y, **opts)
    for i, (a, r, t) in enumerate(zip(got, ref, base)):
        scale = r.abs().max().item()
        ours, theirs = _max_err(a, r), _max_err(t, r)
        assert ours <= 2 * theirs + 1e-3 * scale, \
            f"{dtype} output {i}: our err {ours:.3g} > 2x torch's {theirs:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zero(backend):
    h, w, b, y = _problem(9, 16, 101, torch.float32, bias=True)
    y[:] = -100
    for reduction in ("mean", "sum", "none"):
        out, got = _grads(fused_linear_cross_entropy, h, w, b, y, backend=backend,
                          reduction=reduction, return_accuracy=True, return_z_loss=True, z_loss=1e-3)
        for t in got + [out.z_loss, out.accuracy]:
            assert torch.isfinite(t).all() and (t == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [1, 2])
def test_tiny_batches(backend, N):
    h, w, b, y = _problem(N, 24, 1003, torch.float32, ignore_every=0)
    _, got = _grads(fused_linear_cross_entropy, h, w, b, y, backend=backend)
    _, ref = _ref32(h, w, b, y)
    _assert_fp32(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_3d_inputs(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, 2, 7, 40, generator=g)  # (T, B, ...) -> transposed (B, T, H) view
    h = base[:, :, :3, :].transpose(0, 1).requires_grad_()  # (2, 5, 3, 40), not contiguous
    w_full = torch.randn(40, 301, generator=g) * 0.2
    w = w_full.t().requires_grad_()  # (301, 40), not contiguous
    y = torch.randint(0, 301, (2, 5, 3), generator=g)[:, :, :]
    y = y.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous labels
    y[0, 0, 0] = -100
    assert not h.is_contiguous() and not w.is_contiguous() and not y.is_contiguous()
    _, got = _grads(fused_linear_cross_entropy, h, w, None, y, backend=backend, chunk_size=4)
    _, ref = _ref32(h, w, None, y)
    _assert_fp32(got, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_and_z_loss_outputs(backend):
    h, w, b, y = _problem(40, 32, 257, torch.float32)
    # make some predictions right: label = argmax for every third valid row
    logits = (h @ w.t()).detach()
    y[1::3] = logits[1::3].argmax(-1)
    out = fused_linear_cross_entropy(h, w, y, backend=backend, z_loss=1e-2, return_z_loss=True,
                                     return_accuracy=True, chunk_size=16)
    ref = fused_linear_cross_entropy_reference(h, w, y, z_loss=1e-2, return_z_loss=True,
                                               return_accuracy=True)
    assert out.accuracy.item() == pytest.approx(ref.accuracy.item())
    assert out.accuracy.item() > 0.3
    assert out.z_loss.item() == pytest.approx(ref.z_loss.item(), rel=1e-5)
    assert not out.z_loss.requires_grad and not out.accuracy.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    h, w, b, y = _problem(20, 16, 103, torch.float32)
    w.requires_grad_(False)
    loss = fused_linear_cross_entropy(h, w, y, backend=backend, reduction="none")
    (gh,) = torch.autograd.grad(loss.sum() * 2, [h])
    ref = fused_linear_cross_entropy_reference(h, w, y, reduction="none")
    (rh,) = torch.autograd.grad(ref.sum() * 2, [h])
    _assert_fp32([loss, gh], [ref, rh])
    with torch.no_grad():
        l2 = fused_linear_cross_entropy(h, w, y, backend=backend)
    assert l2.item() == pytest.approx(ref.sum().item() / (y != -100).sum().item(), rel=1e-5)


def test_bad_labels_and_options():
    h, w, b, y = _problem(6, 8, 50, torch.float32, ignore_every=0)
    y[2] = 50
    with pytest.raises(ValueError, match=r"labels: value 50 at flat position 2 is outside \[0, 50\)"):
        fused_linear_cross_entropy(h, w, y)
    y[2] = -5
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(h, w, y)
    y[2] = 1
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(h, w[:, :4], y)
    with pytest.raises(ValueError, match="labels: expected shape"):
        fused_linear_cross_entropy(h, w, y[:3])
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_cross_entropy(h, w.double(), y)


def test_chunk_size_choice_and_module():
    assert default_chunk_size(4096, 49152, torch.float32) in range(512, 1025)
    assert default_chunk_size(1, 128256, torch.float32) == 1
    c = default_chunk_size(1000, 1003, torch.float32)
    assert c == 1000  # small vocab: one chunk
    h, w, b, y = _problem(30, 16, 99, torch.float32)
    mod = FusedLinearCrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    got = mod(h, w, y)
    ref = fused_linear_cross_entropy_reference(h, w, y, label_smoothing=0.1, reduction="sum")
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert "label_smoothing=0.1" in repr(mod)


def test_cpu_kernel_checks_labels_itself():
    if "cpu" not in BACKENDS:
        pytest.skip("fastft._C not built")
    ext = _backend.cpu_ext()
    buf = torch.randn(2, 10)
    y = torch.tensor([3, 10])
    out = torch.empty(2)
    c = torch.empty(2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        ext.cross_entropy_chunk(buf.data_ptr(), 0, 2, 10, 10, y.data_ptr(), torch.ones(2).data_ptr(),
                                out.data_ptr(), out.data_ptr(), c.data_ptr(), 0.0, 0.0, 0.0, True)


@pytest.mark.slow
def test_realistic_shape_cpu_chunks():
    """SmolLM2-like head (H=576, V=49152), 300 tokens, fp32 and bf16, default chunking."""
    be = BACKENDS[0]
    for dtype in (torch.float32, torch.bfloat16):
        h, w, b, y = _problem(300, 576, 49152, dtype, ignore_every=3)
        _, got = _grads(fused_linear_cross_entropy, h, w, b, y, backend=be, chunk_size=128)
        _, ref = _ref32(h, w, b, y)
        if dtype == torch.float32:
            _assert_fp32(got, ref, rtol=5e-5)
        else:
            _, base = _grads(lambda h_, w_, y_, b_: F.cross_entropy(F.linear(h_, w_), y_), h, w, b, y)
            for a, r, t in zip(got, ref, base):
                assert _max_err(a, r) <= 2 * _max_err(t, r) + 1e-3 * r.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])  # "none" runs the deferred backward
def test_fp32_weight_with_16bit_hidden(backend, dtype, reduction):
    """fp32 (tied-embedding) weight, 16-bit hidden (fastft/train/precision.py): GEMMs on the weight
    rounded to the hidden dtype, as autocast does; dWeight comes back in fp32. Errors vs the fp32
    truth within 2x of autocast's own (weight cast to the dtype, PyTorch's 16-bit CE)."""
    N, H, V = (64, 96, 1003) if backend != "triton" else (12, 32, 203)
    h, w16, _, y = _problem(N, H, V, dtype)
    w = (w16.detach().float() + 1e-4 * torch.randn(V, H)).requires_grad_()  # off the 16-bit grid
    opts = dict(reduction=reduction, label_smoothing=0.1)
    _, got = _grads(fused_linear_cross_entropy, h, w, None, y, backend=backend, chunk_size=16, **opts)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == torch.float32
    _, ref = _ref32(h, w, None, y, **opts)

    def autocast_like(h_, w_, y_, b_, label_smoothing=0.0, reduction="mean"):
        logits = F.linear(h_, w_.to(h_.dtype))
        return F.cross_entropy(logits.float(), y_, label_smoothing=label_smoothing, reduction=reduction)

    _, base = _grads(autocast_like, h, w, None, y, **opts)
    for i, (a, r, t) in enumerate(zip(got, ref, base)):
        scale = r.abs().max().item()
        ours, theirs = _max_err(a, r), _max_err(t, r)
        assert ours <= 2 * theirs + 1e-3 * scale, \
            f"{dtype} output {i}: our err {ours:.3g} > 2x autocast's {theirs:.3g} (scale {scale:.3g})"
    # the gradient accumulates into the fp32 parameter's .grad
    fused_linear_cross_entropy(h, w, y, backend=backend).backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):  # 16-bit weight with fp32 hidden: not a supported mix
        fused_linear_cross_entropy(h.detach().float(), w16, y, backend=backend)


def test_logit_scale_is_really_applied():
    """A scaled loss differs from the unscaled one and equals the cross-entropy of scaled logits."""
    h, w, _, y = _problem(9, 13, 57, torch.float32)
    plain = fused_linear_cross_entropy(h, w, y)
    scaled = fused_linear_cross_entropy(h, w, y, logit_scale=0.25)
    keep = y != -100
    expect = torch.nn.functional.cross_entropy((h @ w.T)[keep] * 0.25, y[keep])
    assert abs(plain.item() - scaled.item()) > 1e-3
    torch.testing.assert_close(scaled, expect, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="logit_scale"):
        fused_linear_cross_entropy(h, w, y, logit_scale=0.0)


# ----------------------------------------------------------------------------------------------
# The GPU path (no host sync: every row through the chunks, device-side label check), run on the
# CPU by pretending the CPU is such a device, for every backend here
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def sync_free(monkeypatch):
    import importlib

    fce = importlib.import_module("fastft.ops.fused_linear_cross_entropy")  # the module, not the function

    monkeypatch.setattr(fce, "_sync_free", lambda device: True)
    monkeypatch.setattr(fce, "_BAD_LABELS", {})
    return fce


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0, reduction="sum"),
                                  dict(reduction="none")], ids=["mean", "sum-all", "none"])
def test_sync_free_path_matches_reference(backend, opts, sync_free):
    """Ignored rows run with label 0 and a zero scale: loss, accuracy and every gradient as the
    gathered path (reduction "none" with a trainable weight also runs the deferred backward)."""
    h, w, b, y = _problem(13, 16, 203, torch.float32, bias=True, ignore_every=3)
    out, got = _grads(fused_linear_cross_entropy, h, w, b, y, backend=backend, chunk_size=5,
                      return_accuracy=True, **opts)
    ref_out, ref = _ref32(h, w, b, y, return_accuracy=True, **opts)
    _assert_fp32(got, ref)
    assert out.accuracy.item() == pytest.approx(ref_out.accuracy.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_free_bad_labels_are_nan_and_raise_at_check(backend, sync_free):
    h, w, b, y = _problem(6, 8, 50, torch.float32, ignore_every=0)
    y[2], y[4] = 57, -5
    loss = fused_linear_cross_entropy(h, w, y, backend=backend)
    assert torch.isnan(loss)  # never silently a number
    per = fused_linear_cross_entropy(h, w, y, backend=backend, reduction="none")
    assert torch.isnan(per[2]) and torch.isnan(per[4]) and torch.isfinite(per[[0, 1, 3, 5]]).all()
    gh, gw = torch.autograd.grad(fused_linear_cross_entropy(h, w, y, backend=backend), [h, w])
    assert torch.isnan(gh[2]).all() and torch.isfinite(gh[0]).all() and torch.isnan(gw).any()
    with pytest.raises(ValueError, match=r"outside \[0, 50\).*\(e\.g\. 57"):
        sync_free.check_labels()
    sync_free.check_labels()  # the flag was reset
    y[2], y[4] = 1, -100
    assert torch.isfinite(fused_linear_cross_entropy(h, w, y, backend=backend))
    sync_free.check_labels()


def test_check_labels_is_a_no_op_on_cpu_tensors():
    import importlib

    fce = importlib.import_module("fastft.ops.fused_linear_cross_entropy")  # the module, not the function

    h, w, b, y = _problem(6, 8, 50, torch.float32)
    fused_linear_cross_entropy(h, w, y)
    fce.check_labels()
    assert torch.device("cpu") not in fce._BAD_LABELS
