"""fastft.ops.lora_linear vs its fp32 reference (autograd on the dequantised weight).

Every backend available here (cpu C++ tile dequant, triton under TRITON_INTERPRET=1, torch)
runs odd shapes (N=37, in=67, out=131, r=1 and 16), fp32 and bf16, float and int8 bases, with
and without dropout (same seed -> same mask, the reference gets that mask) and checks the
output and every gradient (x, A, B; a trainable bias too). fp32 must match to ~1e-5; bf16 may be
at most 2x PyTorch's own bf16 error against the fp32 reference (plus a tiny floor).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fastft import _backend
from fastft.ops.lora_linear import Int8Weight, lora_linear, lora_linear_reference, quantize_int8

# the module (the attribute fastft.ops.lora_linear is the public function)
ll = importlib.import_module("fastft.ops.lora_linear")
BACKENDS = [b for b in ("cpu", "triton", "torch") if b in _backend.available_backends("int8_linear", "cpu")]


def _problem(N, IN, OUT, r, dtype, int8, outliers=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g) / IN ** 0.5
    if outliers:
        W[:, [3, 40]] *= 40.0
    base = quantize_int8(W, outlier_threshold=1.0 if outliers else None) if int8 else W.to(dtype)
    x = torch.randn(N, IN, generator=g).to(dtype)
    A = (torch.randn(r, IN, generator=g) / IN ** 0.5).to(dtype)
    B = (torch.randn(OUT, r, generator=g) * 0.5).to(dtype)  # non-zero: the B path is exercised
    bias = (torch.randn(OUT, generator=g) * 0.1).to(dtype)
    dy = torch.randn(N, OUT, generator=g).to(dtype)
    return x, base, A, B, bias, dy


def _run(fn, x, A, B, bias, dy, train_bias):
    x, A, B, bias = (t.detach().clone().requires_grad_(True) for t in (x, A, B, bias))
    bias.requires_grad_(train_bias)
    y = fn(x, A, B, bias)
    y.backward(dy)
    grads = [x.grad, A.grad, B.grad] + ([bias.grad] if train_bias else [])
    return [y.detach()] + grads


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_op_matches_reference(backend, dtype, int8, r, dropout):
    N, IN, OUT = 37, 67, 131
    s = 2.0 / r
    x, base, A, B, bias, dy = _problem(N, IN, OUT, r, dtype, int8)
    train_bias = r == 16
    torch.manual_seed(123)
    seed = ll._draw_seed() if dropout else None
    mask = ll.dropout_mask(seed, N, IN, dropout) if dropout else None

    def op(x_, A_, B_, b_):
        torch.manual_seed(123)  # the op draws the same seed the test drew
        return lora_linear(x_, base, A_, B_, s, dropout=dropout, bias=b_, backend=backend)

    def ref(x_, A_, B_, b_, cast=None):
        f = (lambda t: t.to(cast)) if cast else (lambda t: t)
        bb = base if isinstance(base, Int8Weight) else f(base)
        return lora_linear_reference(f(x_), bb, f(A_), f(B_), s, dropout_mask=mask, bias=f(b_))

    got = _run(op, x, A, B, bias, dy, train_bias)
    want = _run(lambda *a: ref(*a, cast=torch.float32), x.float(), A.float(), B.float(), bias.float(),
                dy.float(), train_bias)
    names = ["y", "dx", "dA", "dB", "dbias"]
    if dtype == torch.float32:
        for n, a, b in zip(names, got, want):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=n)
    else:
        # PyTorch's own bf16 error: plain bf16 autograd (dequantised weight rounded to bf16)
        def torch_bf16(x_, A_, B_, b_):
            W = base.dequantize(torch.bfloat16) if int8 else base
            xd = x_ if mask is None else x_ * mask.to(dtype)
            return x_ @ W.T + b_ + s * ((xd @ A_.T) @ B_.T)

        pt = _run(torch_bf16, x, A, B, bias, dy, train_bias)
        for n, a, p, b in zip(names, got, pt, want):
            scale = b.abs().max().item()
            assert _err(a, b) <= 2 * _err(p, b) + 1e-3 * scale, (n, _err(a, b), _err(p, b))
    for t in got:
        assert t.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_outlier_columns_and_3d_input(backend):
    x, base, A, B, bias, dy = _problem(2 * 9, 67, 131, 4, torch.float32, True, outliers=True)
    assert base.num_outliers == 2 and bool((base.qweight[:, [3, 40]] == 0).all())
    x3, dy3 = x.reshape(2, 9, 67), dy.reshape(2, 9, 131)
    got = _run(lambda x_, A_, B_, b_: lora_linear(x_, base, A_, B_, 0.5, bias=b_, backend=backend),
               x3, A, B, bias, dy3, False)
    want = _run(lambda x_, A_, B_, b_: lora_linear_reference(x_, base, A_, B_, 0.5, bias=b_),
                x3, A, B, bias, dy3, False)
    assert got[0].shape == (2, 9, 131)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_dropout_deterministic_and_applied():
    x, base, A, B, bias, dy = _problem(37, 67, 131, 8, torch.float32, False)
    torch.manual_seed(5)
    y1 = lora_linear(x, base, A, B, 1.0, dropout=0.5)
    torch.manual_seed(5)
    y2 = lora_linear(x, base, A, B, 1.0, dropout=0.5)
    y0 = lora_linear(x, base, A, B, 1.0)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y0)
    m = ll.dropout_mask(7, 2500, 67, 0.3)  # spans 3 row blocks
    assert m.shape == (2500, 67) and abs((m == 0).float().mean().item() - 0.3) < 0.01
    assert torch.equal(m[m != 0], torch.full_like(m[m != 0], 1 / 0.7))


def test_tiles_cover_wide_weights(monkeypatch):
    """More than one tile in each direction (TILE shrunk), the cpu and torch tile loops agree."""
    monkeypatch.setattr(ll, "TILE", 32)
    x, base, A, B, bias, dy = _problem(37, 67, 131, 16, torch.float32, True, outliers=True)
    want = _run(lambda x_, A_, B_, b_: lora_linear_reference(x_, base, A_, B_, 0.7, bias=b_), x, A, B, bias, dy, True)
    for be in [b for b in BACKENDS if b != "triton"]:
        got = _run(lambda x_, A_, B_, b_: lora_linear(x_, base, A_, B_, 0.7, bias=b_, backend=be),
                   x, A, B, bias, dy, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_frozen_base_gets_no_grad_and_saves_no_output_sized_tensor():
    x, W, A, B, bias, dy = _problem(37, 67, 131, 4, torch.float32, False)
    W.requires_grad_(True)
    x.requires_grad_(True)
    A.requires_grad_(True)
    y = lora_linear(x, W, A, B, 1.0)
    saved = [t for t in y.grad_fn.saved_tensors]
    assert all(t.shape != (37, 131) for t in saved)  # not x Wᵀ
    assert sum(t.numel() for t in saved if t.shape[0] == 37) == 37 * 67 + 37 * 4  # x and u only
    y.backward(dy)
    assert W.grad is None and x.grad is not None and A.grad is not None and B.grad is None


@pytest.mark.parametrize("outliers", [False, True])
def test_quantisation_error_bound(outliers):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(131, 67, generator=g)
    W[5] = 0.0  # an all-zero row must not divide by zero
    if outliers:
        W[:, 10] *= 30
    q = quantize_int8(W, outlier_threshold=8.0 if outliers else None)
    err = (q.dequantize() - W).abs()
    bound = q.scale[:, None] / 2 * (1 + 1e-6) + 1e-7
    if outliers:
        assert q.outlier_idx.tolist() == [10]
        cols = torch.ones(67, dtype=torch.bool)
        cols[10] = False
        assert bool((err[:, cols] <= bound).all())
        assert bool((err[:, 10] <= W[:, 10].abs() * 2 ** -10).all())  # fp16 rounding
    else:
        assert bool((err <= bound).all())
    assert float(err[5].max()) == 0.0 and q.qweight.abs().max() <= 127
    rel = (q.dequantize() - W).norm() / W.norm()
    assert rel < 0.01  # absmax int8 on Gaussian rows: ~0.5%
    assert q.nbytes() <= 0.3 * W.numel() * 4


def test_cpu_dequant_tile_matches_torch():
    if "cpu" not in BACKENDS:
        pytest.fail("fastft._C has no int8_linear (rebuild the extension)")
    W = torch.randn(131, 67)
    W[:, [0, 66]] *= 50
    for sdt in (torch.float32, torch.bfloat16):
        for wdt in (torch.float32, torch.bfloat16):
            q = quantize_int8(W.to(wdt), outlier_threshold=10.0, scale_dtype=sdt)
            for dt in (torch.float32, torch.bfloat16):
                for (r0, r1, c0, c1) in [(0, 131, 0, 67), (7, 50, 0, 67), (0, 131, 30, 67), (0, 131, 1, 66)]:
                    assert torch.equal(ll._cpu_dequant_tile(q, r0, r1, c0, c1, dt),
                                       q.dequantize_tile(r0, r1, c0, c1, dt)), (sdt, wdt, dt, r0, c0)


@pytest.mark.parametrize("bad, match", [
    (lambda x, W, A, B: lora_linear(x, W[None], A, B, 1.0), "must be 2-D"),
    (lambda x, W, A, B: lora_linear(x, W, A[:, :5], B, 1.0), r"lora_A must be \(r, 67\)"),
    (lambda x, W, A, B: lora_linear(x, W, A, B[:, :2], 1.0), r"lora_B must be \(131, 4\)"),
    (lambda x, W, A, B: lora_linear(x, W, A[:0], B[:, :0], 1.0), "r >= 1"),
    (lambda x, W, A, B: lora_linear(x[:, :60], W, A, B, 1.0), r"x must be float \(\.\.\., 67\)"),
    (lambda x, W, A, B: lora_linear(x, W.double(), A, B, 1.0), "dtype"),
    (lambda x, W, A, B: lora_linear(x, W, A, B, 1.0, dropout=1.0), "dropout=1.0"),
    (lambda x, W, A, B: lora_linear(x, W, A, B, 1.0, bias=torch.zeros(3)), r"bias must be \(131,\)"),
    (lambda x, W, A, B: quantize_int8(W[0]), "2-D float weight"),
    (lambda x, W, A, B: Int8Weight(torch.zeros(3, 4, dtype=torch.int8), torch.ones(2)), "scale"),
])
def test_bad_input(bad, match):
    x, W, A, B, bias, dy = _problem(5, 67, 131, 4, torch.float32, False)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(x, W, A, B)


def test_zero_rows():
    x, base, A, B, bias, dy = _problem(0, 67, 131, 4, torch.float32, True)
    x.requires_grad_(True)
    y = lora_linear(x, base, A, B, 1.0)
    y.sum().backward()
    assert y.shape == (0, 131) and x.grad.shape == (0, 67)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_backward_accumulates_into_a_given_input_gradient(backend, int8, dropout):
    """lora_backward / int8_backward with ``acc`` (what fastft/models/fused_layer.py uses to sum the q/k/v
    and gate/up input gradients): dx comes back as acc + dX in place, the weight grads unchanged."""
    x, base, A, B, bias, dy = _problem(37, 67, 131, 16, torch.float32, int8, outliers=int8)
    x, A, B = (t.clone().requires_grad_(True) for t in (x, A, B))
    prior = torch.randn(37, 67, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    y = lora_linear(x, base, A, B, 0.7, dropout=dropout, backend=backend)
    assert type(y.grad_fn).__name__ == "_LoRALinearFnBackward"
    plain = ll.lora_backward(y.grad_fn, dy)
    acc = prior.clone()
    got = ll.lora_backward(y.grad_fn, dy, acc)
    assert got[0] is acc
    torch.testing.assert_close(acc, prior + plain[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2:4], plain[2:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if not int8:
        return
    xi = x.detach().clone().requires_grad_(True)
    y = ll.int8_linear(xi, base, backend=backend)
    plain = ll.int8_backward(y.grad_fn, dy)
    acc = prior.clone()
    assert ll.int8_backward(y.grad_fn, dy, acc)[0] is acc
    torch.testing.assert_close(acc, prior + plain[0], rtol=1e-5, atol=1e-5)
