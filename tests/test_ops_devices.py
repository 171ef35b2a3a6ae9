"""Every fused op, on every device present, through every backend available there, against its
fp32 reference: outputs and every gradient.

* On a CUDA machine this runs the real Triton and CUDA kernels (no interpreter) with TF32 off, on
  the multi-tile shapes below plus larger GPU-only ones: the GPU test subset of
  benchmarks/gpu_check.sh. Files like test_fused_linear_cross_entropy.py stay CPU tests.
* On the CPU the Triton kernels run under the interpreter, on shapes that still reach their
  multi-tile paths: a vocabulary spanning several BLOCK_V tiles of the CE kernel, more RMSNorm rows
  than backward programs, lora_mm with its GPU tiles (64x128x32) and ragged edges, attention with T
  not a multiple of its tile. Small enough for CI (the interpreter is slow).

Tolerances: fp32 within ~1e-5 relative of the reference (GPU reductions reassociate); the
elementwise ops round once per output, so 16-bit outputs are within 2 ulps; ops with GEMMs in
16 bits (CE, attention, LoRA) within 2x PyTorch's own error at that precision plus a small floor.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastft import _backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ON_GPU = torch.cuda.is_available()


def cases(op: str, skip_torch: bool = False) -> list:
    """(device, backend) for every backend of ``op`` available on every device present."""
    out = []
    for dev in DEVICES:
        for be in _backend.available_backends(op, dev):
            if skip_torch and be == "torch":
                continue
            out.append(pytest.param(dev, be, id=f"{dev}-{be}"))
    return out


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 GEMMs exact on GPUs (TF32 would miss fp32 tolerances; no test here is about TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rand(shape, dtype, dev, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(dev)


def _fwd_bwd(fn, inputs, seed=99):
    """[outputs..., grads of inputs...] for random output gradients (fp32 copies)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    g = torch.Generator().manual_seed(seed)
    # output gradients rounded to the inputs' dtype first: the same values reach the 16-bit op and
    # the fp32 reference
    gos = [torch.randn(o.shape, generator=g).to(inputs[0].dtype).to(o.dtype).to(o.device) for o in outs]
    grads = torch.autograd.grad(outs, leaves, gos, allow_unused=True)
    return [o.detach().float() for o in outs] + [None if x is None else x.float() for x in grads]


def _ulp_check(got, ref, dtype, what):
    """fp32: 1e-5 relative (of the tensor's scale); 16-bit: 2 ulps of the element."""
    for i, (a, r) in enumerate(zip(got, ref)):
        if a is None and r is None:
            continue
        if dtype == torch.float32:
            scale = max(r.abs().max().item(), 1e-6)
            err = (a - r).abs().max().item()
            assert err <= 1e-5 * scale + 1e-7, f"{what} output {i}: err {err:.3g} (scale {scale:.3g})"
        else:
            ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
            bound = 2 * ulp * r.abs() + 2 * ulp * 1e-3 * r.abs().max()
            bad = (a - r).abs() > bound
            assert not bad.any(), f"{what} output {i}: {int(bad.sum())} elements beyond 2 ulps, e.g. " \
                f"{a[bad][:3].tolist()} vs {r[bad][:3].tolist()}"


def _two_x_torch(got, ref, torch_lp, what, floor=1e-3):
    """Each output's max error vs the fp32 reference is at most 2x PyTorch's own at the dtype."""
    for i, (a, r, t) in enumerate(zip(got, ref, torch_lp)):
        if r is None:
            continue
        scale = r.abs().max().item()
        ours, theirs = (a - r).abs().max().item(), (t - r).abs().max().item()
        assert ours <= 2 * theirs + floor * scale, f"{what} output {i}: err {ours:.3g} > 2x torch's {theirs:.3g}"


DTYPES = [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------------------------
# Elementwise ops
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev,be", cases("rms_norm"))
def test_rms_norm(dev, be, dtype):
    from fastft.ops.rms_norm import rms_norm, rms_norm_reference

    # fp32 on 300 rows: more than the Triton backward's 256 programs (2 rows each; the interpreter
    # is slow, so bf16 gets a small shape on the CPU)
    multi = dtype == torch.float32 or dev == "cuda"
    shapes = [(300, 40) if multi else (7, 40)] + ([(2048, 4096)] if dev == "cuda" else [])
    for rows, n in shapes:
        x, w = _rand((rows, n), dtype, dev, 1), _rand((n,), dtype, dev, 2)
        got = _fwd_bwd(lambda a, b: rms_norm(a, b, 1e-6, forced=be), [x, w])
        ref = _fwd_bwd(lambda a, b: rms_norm_reference(a, b, 1e-6).float(), [x, w])
        _ulp_check(got[:2], ref[:2], dtype, f"rms_norm {rows}x{n}")  # y, dx: one rounding each
        # dweight sums `rows` products: a reduction, not one rounding
        _two_x_torch([got[2]], [ref[2]], [ref[2].to(dtype).float()], f"rms_norm dw {rows}x{n}", floor=2e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev,be", cases("swiglu"))
def test_swiglu(dev, be, dtype):
    from fastft.ops.swiglu import swiglu, swiglu_reference

    shapes = [(3, 1500)] + ([(4096, 8192)] if dev == "cuda" else [])  # 5 Triton blocks; GPU: 32M elements
    for shape in shapes:
        g, u = _rand(shape, dtype, dev, 1), _rand(shape, dtype, dev, 2)
        got = _fwd_bwd(lambda a, b: swiglu(a, b, forced=be), [g, u])
        ref = _fwd_bwd(lambda a, b: swiglu_reference(a.float(), b.float()), [g, u])
        _ulp_check(got, ref, dtype, f"swiglu {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev,be", cases("rope"))
def test_rope(dev, be, dtype):
    from fastft.ops.rope import rope, rope_reference

    B, Hq, Hk, T, D = (1, 2, 1, 19, 64) if dev == "cpu" else (4, 32, 8, 1000, 128)
    q, k = _rand((B, Hq, T, D), dtype, dev, 1), _rand((B, Hk, T, D), dtype, dev, 2)
    ang = torch.arange(T)[:, None] * torch.exp(-torch.arange(D // 2) / 8.0)[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None].to(dtype).to(dev)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None].to(dtype).to(dev)
    got = _fwd_bwd(lambda a, b: rope(a, b, cos, sin, forced=be), [q, k])
    ref = _fwd_bwd(lambda a, b: rope_reference(a.float(), b.float(), cos.float(), sin.float()), [q, k])
    _ulp_check(got, ref, dtype, "rope")


# ----------------------------------------------------------------------------------------------
# Fused linear cross-entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev,be", cases("cross_entropy"))
def test_cross_entropy(dev, be, dtype):
    from fastft.ops.fused_linear_cross_entropy import (fused_linear_cross_entropy,
                                                       fused_linear_cross_entropy_reference)

    # vocab over three 4096-wide BLOCK_V tiles plus a ragged one; 2 chunks of rows; ignored rows
    N, H, V = (300, 256, 32007) if dev == "cuda" else (6, 8, 3 * 4096 + 123)
    h = _rand((N, H), dtype, dev, 1)
    w = _rand((V, H), dtype, dev, 2, scale=H ** -0.5 * 2)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    y[::5] = -100
    y = y.to(dev)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    got = _fwd_bwd(lambda a, b: fused_linear_cross_entropy(a, b, y, backend=be, chunk_size=N // 2 + 1, **opts),
                   [h, w])
    ref = _fwd_bwd(lambda a, b: fused_linear_cross_entropy_reference(a.float(), b.float(), y, **opts), [h, w])
    if dtype == torch.float32:
        _ulp_check(got, ref, dtype, "fused CE")
    else:
        def torch_lp(a, b):
            logits = F.linear(a, b)
            valid = y != -100
            ce = F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
            return (ce + 1e-3 * torch.logsumexp(logits.float(), -1).square() * valid).sum() / valid.sum()

        _two_x_torch(got, ref, _fwd_bwd(torch_lp, [h, w]), "fused CE")


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dev,be", cases("attention"))
def test_attention(dev, be, dtype):
    from fastft.ops.attention import attention_reference, causal_attention

    # T not a multiple of any tile (16/32/64); GQA group 2; head dims 64 and a padded 40
    shapes = [(1, 4, 2, 45, 64), (1, 2, 1, 21, 40)] + ([(2, 8, 2, 300, 128)] if dev == "cuda" else [])
    for B, Hq, Hk, T, D in shapes:
        q, k, v = _rand((B, Hq, T, D), dtype, dev, 1), _rand((B, Hk, T, D), dtype, dev, 2), \
            _rand((B, Hk, T, D), dtype, dev, 3)
        got = _fwd_bwd(lambda a, b, c: causal_attention(a, b, c, forced=be), [q, k, v])
        ref = _fwd_bwd(lambda a, b, c: attention_reference(a.float(), b.float(), c.float()), [q, k, v])
        sdpa = _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, is_causal=True, enable_gqa=Hq != Hk), [q, k, v])
        what = f"attention {B}x{Hq}/{Hk}x{T}x{D}"
        if dtype == torch.float32:
            _two_x_torch(got, ref, sdpa, what, floor=1e-5)
        else:
            _two_x_torch(got, ref, sdpa, what)


# ----------------------------------------------------------------------------------------------
# LoRA linear (float and int8 base) and its GEMM kernel
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("int8", [False, True], ids=["float-base", "int8-base"])
@pytest.mark.parametrize("dev,be", cases("int8_linear"))
def test_lora_linear(dev, be, int8):
    from fastft.ops.lora_linear import lora_linear, lora_linear_reference, quantize_int8

    N, IN, OUT, R = (70, 70, 130, 4) if dev == "cpu" else (1000, 2048, 2560, 16)
    x = _rand((N, IN), torch.float32, dev, 1)
    W = _rand((OUT, IN), torch.float32, dev, 2, scale=IN ** -0.5)
    base = quantize_int8(W) if int8 else W
    A, Bm = _rand((R, IN), torch.float32, dev, 3, 0.1), _rand((OUT, R), torch.float32, dev, 4, 0.1)
    bias = _rand((OUT,), torch.float32, dev, 5)
    got = _fwd_bwd(lambda a, b, c, d: lora_linear(a, base, b, c, 2.0, bias=d, backend=be), [x, A, Bm, bias])
    ref = _fwd_bwd(lambda a, b, c, d: lora_linear_reference(a, base, b, c, 2.0, bias=d), [x, A, Bm, bias])
    for i, (a, r) in enumerate(zip(got, ref)):
        scale = r.abs().max().item()
        assert (a - r).abs().max().item() <= 2e-5 * scale + 1e-6, f"lora_linear output {i}"


@pytest.mark.skipif(not ("triton" in _backend.available_backends("int8_linear", DEVICES[-1])),
                    reason="Triton not available on this device")
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_lora_mm_gpu_tiles(int8):
    """kernels/lora_linear.lora_mm with the GPU's 64x128x32 tiles (the interpreter's default is
    32^3): M, N, K ragged against every tile, the low-rank epilogue over two BK2 slices, a per-N
    int8 scale (forward) and a per-K one (dX)."""
    from fastft.kernels.lora_linear import lora_mm
    from fastft.ops.lora_linear import quantize_int8

    dev = DEVICES[-1]
    M, N, K, K2 = 70, 130, 70, 80
    a = _rand((M, K), torch.float32, dev, 1)
    W = _rand((N, K), torch.float32, dev, 2, scale=K ** -0.5)
    u, v = _rand((M, K2), torch.float32, dev, 3), _rand((N, K2), torch.float32, dev, 4)
    bias = _rand((N,), torch.float32, dev, 5)
    if int8:
        q = quantize_int8(W)
        Wd = q.dequantize()
        fwd = lora_mm(a, q.qweight, (1, K), N, q.scale, False, u, v, (1, K2), bias, tiles=(64, 128, 32))
        dy = _rand((M, N), torch.float32, dev, 6)
        dx = lora_mm(dy, q.qweight, (K, 1), K, q.scale, True, None, None, (0, 0), None, tiles=(64, 128, 32))
        torch.testing.assert_close(dx, dy @ Wd, rtol=2e-5, atol=2e-5)
    else:
        Wd = W
        fwd = lora_mm(a, W, (1, K), N, None, False, u, v, (1, K2), bias, tiles=(64, 128, 32))
    torch.testing.assert_close(fwd, a @ Wd.T + bias + u @ v.T, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# AdamW
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dev,be", cases("adamw", skip_torch=True))
def test_adamw_three_steps(dev, be):
    """fused clip + step (fp32 params, and a bf16 param with an fp32 master) vs the reference."""
    from fastft.ops.adamw import AdamWGroup, fused_adamw

    shapes = [(37,), (5, 300), (70000,)] + ([(4096, 4096)] if dev == "cuda" else [])

    def group(params):
        n = len(params)
        masters = [p.float().clone() if p.dtype == torch.bfloat16 else None for p in params]
        return AdamWGroup(params, [None] * n, [torch.zeros_like(p, dtype=torch.float32) for p in params],
                          [torch.zeros_like(p, dtype=torch.float32) for p in params], [], masters,
                          [torch.zeros((), device=dev) for _ in params], 1e-2, 0.9, 0.999, 1e-8, 0.1)

    ps = [_rand(s, torch.float32, dev, i) for i, s in enumerate(shapes)] + [_rand((333,), torch.bfloat16, dev, 9)]
    ours, ref = group([p.clone() for p in ps]), group([p.clone() for p in ps])
    for step in range(3):
        grads = [_rand(p.shape, p.dtype, dev, 100 + 10 * step + i) for i, p in enumerate(ps)]
        ours.grads, ref.grads = [g.clone() for g in grads], [g.clone() for g in grads]
        r1 = fused_adamw([ours], max_grad_norm=1.0, forced=be)
        r2 = fused_adamw([ref], max_grad_norm=1.0, forced="torch")
        torch.testing.assert_close(r1.norm, r2.norm, rtol=1e-6, atol=0)
    for a, b, m in zip(ours.params, ref.params, ours.masters):
        if m is None:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)
    for a, b in zip(ours.exp_avg_sqs + [m for m in ours.masters if m is not None],
                    ref.exp_avg_sqs + [m for m in ref.masters if m is not None]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-9)


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80():
    """Without a GPU: every non-attention Triton kernel, with its GPU launch parameters, compiles
    to an sm_80 cubin (the attention ones: test_attention_triton.py). Interpreter runs never
    compile, so this is what says the int64 offsets, the CE barrier etc. build for a real GPU."""
    import json
    import os
    import subprocess
    import sys

    from test_attention_triton import _ptxas_available

    if not _ptxas_available():
        pytest.skip("triton's ptxas not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_sm80_compile_ops.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == 2 * 12 and all(v > 0 for v in sizes.values())
