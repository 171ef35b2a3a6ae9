"""fastft.ops.attention: causal GQA attention vs the fp32 reference, output and every gradient.

fp32: equal to the reference up to summation order. bf16/fp16: the kernel's error against the
fp32 reference is at most 2x PyTorch's own SDPA error in that dtype (measured in the test) plus a
small floor. Shapes cover odd head dims, sequence lengths that are not multiples of the kernel's
64-row query block or 8x32 micro-tile, GQA groups of 1, 3 and 4, and HF's strided layouts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastft import _backend
from fastft.ops.attention import attention_reference, causal_attention

CPU_BUILT = "cpu" in _backend.available_backends("attention", "cpu")
needs_cpu = pytest.mark.skipif(not CPU_BUILT, reason="fastft._C has no attention kernel")

# (B, Hq, Hkv, T, D)
SHAPES = [(2, 3, 1, 37, 16), (1, 2, 2, 130, 64), (2, 4, 1, 1, 8), (1, 6, 2, 203, 40), (3, 9, 3, 64, 64),
          (1, 2, 1, 33, 7)]
# bf16 on the CPU kernel has two paths: AVX512-BF16 dot products (when the CPU has them) and the
# fp32-FMA tiles every CPU runs; both are checked, the first only where the CPU can run it.
HAS_BF16_DOT = CPU_BUILT and _backend.cpu_ext().attention_has_bf16_dot()
LOW_PRECISION = [pytest.param(torch.bfloat16, True, id="bf16-dot",
                              marks=pytest.mark.skipif(not HAS_BF16_DOT, reason="no AVX512-BF16")),
                 pytest.param(torch.bfloat16, False, id="bf16-fma"), pytest.param(torch.float16, False, id="fp16")]


@pytest.fixture
def bf16_dot(request):
    """Sets the CPU kernel's bf16 path for one test (request.param) and restores it."""
    ext = _backend.cpu_ext()
    prev = ext.attention_bf16_dot(request.param)
    yield request.param
    ext.attention_bf16_dot(prev)


# The fp32 GEMM tiles come in one variant per instruction set (plain C++, AVX2+FMA, AVX-512);
# each test below runs every variant this CPU can execute (all three on an AVX-512 machine).
TILE_ISAS = _backend.cpu_ext().attention_tile_isas() if CPU_BUILT else ["generic"]


@pytest.fixture(params=TILE_ISAS)
def tile_isa(request):
    """Forces the CPU kernel's fp32 tiles to one instruction set for one test and restores auto."""
    ext = _backend.cpu_ext()
    prev = ext.attention_tile_isa("auto" if request.param == "avx512" else request.param)
    yield request.param
    ext.attention_tile_isa(prev)


def _inputs(shape, dtype, layout="bthd", seed=0):
    b, hq, hkv, t, d = shape
    g = torch.Generator().manual_seed(seed)

    def make(h):
        if layout == "bthd":  # HF: (B, T, H, D) projections viewed as (B, H, T, D)
            x = torch.randn(b, t, h, d, generator=g).transpose(1, 2)
        else:
            x = torch.randn(b, h, t, d, generator=g)
        return x.to(dtype).requires_grad_()

    q, k, v = make(hq), make(hkv), make(hkv)
    dout = torch.randn(b, hq, t, d, generator=g).to(dtype)
    return q, k, v, dout


def _run(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _reference(q, k, v, dout):
    return _run(attention_reference, *(x.detach().float() for x in (q, k, v)), dout.float())


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


NAMES = ("out", "dq", "dk", "dv")


@needs_cpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_fp32_matches_reference(shape, layout, tile_isa):
    q, k, v, dout = _inputs(shape, torch.float32, layout)
    ours = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu"), q, k, v, dout)
    ref = _reference(q, k, v, dout)
    for name, a, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6 * max(r.abs().max().item(), 1.0), msg=name)


@needs_cpu
@pytest.mark.parametrize("dtype,bf16_dot", LOW_PRECISION, indirect=["bf16_dot"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_low_precision_error_within_2x_of_sdpa(shape, dtype, bf16_dot, tile_isa):
    q, k, v, dout = _inputs(shape, dtype)
    ref = _reference(q, k, v, dout)
    ours = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu"), q, k, v, dout)
    torch_own = _run(_sdpa, q, k, v, dout)
    for name, a, t, r in zip(NAMES, ours, torch_own, ref):
        scale = r.abs().max().item()
        err, terr = (a - r).abs().max().item(), (t - r).abs().max().item()
        assert err <= 2 * terr + 1e-3 * scale, f"{name}: {err:.3g} vs SDPA {dtype} {terr:.3g}"


@needs_cpu
def test_tile_isa_switch():
    """The switch really changes the tiles (results differ in the last bits between the plain and
    the FMA tiles on the same input) and rejects what this CPU cannot run."""
    ext = _backend.cpu_ext()
    assert ext.attention_tile_isa() == "auto"
    with pytest.raises(ValueError, match="expected auto, generic"):
        ext.attention_tile_isa("sse9")
    if "avx2" not in TILE_ISAS:
        pytest.skip("no AVX2+FMA on this CPU")
    q, k, v, dout = _inputs((1, 3, 1, 90, 40), torch.float32)
    outs = {}
    for isa in ("generic", "avx2"):
        ext.attention_tile_isa(isa)
        try:
            outs[isa] = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu"), q, k, v, dout)
        finally:
            ext.attention_tile_isa("auto")
    assert any(not torch.equal(a, b) for a, b in zip(outs["generic"], outs["avx2"]))


@needs_cpu
def test_output_and_gradient_layouts():
    """The output is a (B, H, T, D) view of a (B, T, H, D)-contiguous tensor (free reshape for
    o_proj); gradients come back in the projections' (B, T, H, D) layout."""
    q, k, v, dout = _inputs((2, 4, 2, 19, 8), torch.float32)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = causal_attention(q, k, v, forced="cpu")
    assert out.shape == (2, 4, 19, 8) and out.transpose(1, 2).is_contiguous()
    out.backward(dout)
    for x in (q, k, v):
        assert x.grad.transpose(1, 2).is_contiguous()


@needs_cpu
def test_non_contiguous_last_dim_and_custom_scale():
    q, k, v, dout = _inputs((1, 2, 1, 33, 12), torch.float32, layout="bhtd")
    qs = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()  # stride(-1) != 1
    assert qs.stride(-1) != 1
    fn = lambda a, b, c: causal_attention(a, b, c, scale=0.37, forced="cpu")  # noqa: E731
    ours = _run(fn, qs, k, v, dout)
    ref = _run(lambda a, b, c: attention_reference(a, b, c, scale=0.37), qs, k, v, dout)
    for name, a, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)


def test_torch_backend_is_sdpa():
    q, k, v, dout = _inputs((2, 4, 2, 21, 16), torch.float32)
    ours = _run(lambda a, b, c: causal_attention(a, b, c, forced="torch"), q, k, v, dout)
    for name, a, r in zip(NAMES, ours, _reference(q, k, v, dout)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (q[0], k, v), "4-D"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), "expected k and v of shape"),
    (lambda q, k, v: (q[:, :3], k[:, :2], v[:, :2]), "multiple"),
    (lambda q, k, v: (q, k.double(), v), "one float dtype"),
])
def test_bad_input_is_a_clear_error(bad, match):
    q, k, v, _ = _inputs((1, 4, 2, 7, 8), torch.float32)
    with pytest.raises(ValueError, match=match):
        causal_attention(*bad(q.detach(), k.detach(), v.detach()))


@needs_cpu
@pytest.mark.skipif(not HAS_BF16_DOT, reason="no AVX512-BF16")
def test_bf16_dot_path_is_the_default_and_differs_from_fma():
    """The dot-product path really runs by default (it rounds P to bf16, the FMA path does not, so
    their outputs differ in the last bits) and the switch restores its previous value."""
    ext = _backend.cpu_ext()
    q, k, v, dout = _inputs((1, 2, 1, 70, 16), torch.bfloat16)
    assert ext.attention_bf16_dot() is True
    dot = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu"), q, k, v, dout)
    assert ext.attention_bf16_dot(False) is True
    try:
        fma = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu"), q, k, v, dout)
    finally:
        ext.attention_bf16_dot(True)
    assert not torch.equal(dot[0], fma[0])
    for name, a, b in zip(NAMES, dot, fma):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05, msg=name)
