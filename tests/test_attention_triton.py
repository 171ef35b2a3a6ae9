"""fastft.ops.attention on the Triton backend (run by the interpreter, TRITON_INTERPRET=1 from
conftest) and the CUDA binding's argument checks; the CPU backend is tests/test_attention.py,
whose helpers this file reuses.

fp32: equal to the fp32 reference up to summation order. bf16/fp16: error against the reference
at most 2x PyTorch's own SDPA error in that dtype plus a small floor. Shapes: odd T (37, 70: not
multiples of the 32-row interpreter tiles), odd head dims padded to a power of two (40, 8 -> 16),
T = 1, GQA groups 1 and 3, HF's (B, T, H, D) strided layout and contiguous (B, H, T, D).
The interpreter is slow (~1 s per forward+backward here): shapes stay small.
"""
from __future__ import annotations

import pytest
import torch
from test_attention import NAMES, _inputs, _reference, _run, _sdpa

from fastft import _backend
from fastft.ops.attention import attention_reference, causal_attention

TRITON = "triton" in _backend.available_backends("attention", "cpu")
pytestmark = pytest.mark.skipif(not TRITON, reason="triton not installed or TRITON_INTERPRET unset")

# (B, Hq, Hkv, T, D)
SHAPES = [(2, 3, 1, 37, 16), (1, 6, 2, 37, 40), (1, 2, 2, 70, 64), (2, 4, 1, 1, 8)]
_ids = lambda s: "x".join(map(str, s))  # noqa: E731


def _triton(q, k, v, **kw):
    return causal_attention(q, k, v, forced="triton", **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_fp32_matches_reference(shape, layout):
    q, k, v, dout = _inputs(shape, torch.float32, layout)
    ours = _run(_triton, q, k, v, dout)
    for name, a, r in zip(NAMES, ours, _reference(q, k, v, dout)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6 * max(r.abs().max().item(), 1.0), msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_low_precision_error_within_2x_of_sdpa(shape, dtype):
    q, k, v, dout = _inputs(shape, dtype)
    ref = _reference(q, k, v, dout)
    ours = _run(_triton, q, k, v, dout)
    torch_own = _run(_sdpa, q, k, v, dout)
    for name, a, t, r in zip(NAMES, ours, torch_own, ref):
        scale = r.abs().max().item()
        err, terr = (a - r).abs().max().item(), (t - r).abs().max().item()
        assert err <= 2 * terr + 1e-3 * scale, f"{name}: {err:.3g} vs SDPA {dtype} {terr:.3g}"


def test_layouts_custom_scale_and_non_contiguous_last_dim():
    """A scale other than 1/sqrt(D); a q whose last dim is strided (the op copies it before the
    kernel); output and gradients in the (B, T, H, D) layout."""
    q, k, v, dout = _inputs((1, 4, 2, 33, 12), torch.float32, layout="bhtd")
    qs = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert qs.stride(-1) != 1
    out = _triton(qs, k, v, scale=0.37)
    assert out.transpose(1, 2).is_contiguous()
    ours = _run(lambda a, b, c: _triton(a, b, c, scale=0.37), qs, k, v, dout)
    ref = _run(lambda a, b, c: attention_reference(a, b, c, scale=0.37), qs, k, v, dout)
    for name, a, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6, msg=name)
    q2, k2, v2, dout2 = _inputs((1, 4, 2, 9, 8), torch.float32)  # HF's (B, T, H, D) projections
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q2, k2, v2))
    _triton(q2, k2, v2).backward(dout2)
    for x in (q2, k2, v2):
        assert x.grad.transpose(1, 2).is_contiguous()


def test_empty_batch():
    q, k, v, dout = _inputs((0, 2, 1, 5, 8), torch.float32)
    ours = _run(_triton, q, k, v, dout)
    assert [tuple(x.shape) for x in ours] == [(0, 2, 5, 8), (0, 2, 5, 8), (0, 1, 5, 8), (0, 1, 5, 8)]


def test_head_dim_above_kernel_limit_runs_sdpa():
    """D > 256 exceeds the GPU kernels' tiles: the op answers with SDPA instead of failing."""
    q, k, v, dout = _inputs((1, 2, 1, 5, 264), torch.float32)
    ours = _run(_triton, q, k, v, dout)
    for name, a, r in zip(NAMES, ours, _reference(q, k, v, dout)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)
    from fastft.kernels.attention import attention_fwd_triton
    with pytest.raises(ValueError, match="head dim 264"):
        attention_fwd_triton(q.detach(), k.detach(), v.detach(), torch.empty_like(q), torch.empty(1, 2, 5), 0.1)


CUDA_EXT = _backend.cuda_ext()
needs_cuda_binding = pytest.mark.skipif(CUDA_EXT is None or "attention" not in getattr(CUDA_EXT, "ops", ()),
                                        reason="fastft._C_cuda not built with the attention kernels")


@needs_cuda_binding
@pytest.mark.parametrize("bad,match", [
    (dict(D=300), r"D=300 \(need Hq % Hkv == 0 and 0 < D <= 256\)"),
    (dict(Hq=3, Hkv=2), "Hq=3 Hkv=2"),
    (dict(dtype=5), "dtype code 5"),
    (dict(qs=[1, 2]), "q strides have 2 entries"),
])
def test_cuda_binding_rejects_bad_arguments_before_launch(bad, match):
    """The checks run on the host before any CUDA call, so they are testable without a GPU."""
    a = dict(B=1, Hq=2, Hkv=1, T=4, D=8, dtype=0, qs=[64, 32, 8])
    a.update(bad)
    s = [64, 32, 8]
    with pytest.raises(ValueError, match=match):
        CUDA_EXT.attention_fwd(0, a["qs"], 0, s, 0, s, 0, s, 0, a["B"], a["Hq"], a["Hkv"], a["T"], a["D"], 0.5,
                               a["dtype"], 0)
    with pytest.raises(ValueError, match=match):
        CUDA_EXT.attention_bwd(0, a["qs"], 0, s, 0, s, 0, s, 0, s, 0, 0, s, 0, s, 0, s, a["B"], a["Hq"], a["Hkv"],
                               a["T"], a["D"], 0.5, a["dtype"], 0)
    assert CUDA_EXT.attention_max_head_dim == 256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [40, 72, 200])
def test_gpu_tile_shapes_under_the_interpreter(d, dtype, monkeypatch):
    """The GPU's tiles (BM != BN, 16-row tiles, 64-row tiles longer than T) run under the
    interpreter too, so tile-size bookkeeping the default 32x32 tiles would hide is checked."""
    from fastft.kernels import attention as kern
    bd = max(16, 1 << (d - 1).bit_length())
    monkeypatch.setattr(kern, "_INTERPRETER_TILES", kern._gpu_tiles(bd, dtype))
    shape = (1, 3, 1, 45, d)
    q, k, v, dout = _inputs(shape, dtype)
    ref = _reference(q, k, v, dout)
    ours = _run(_triton, q, k, v, dout)
    torch_own = _run(_sdpa, q, k, v, dout) if dtype != torch.float32 else None
    for i, (name, a, r) in enumerate(zip(NAMES, ours, ref)):
        if torch_own is None:
            torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6 * max(r.abs().max().item(), 1.0), msg=name)
        else:
            err, terr = (a - r).abs().max().item(), (torch_own[i] - r).abs().max().item()
            assert err <= 2 * terr + 1e-3 * r.abs().max().item(), f"{name}: {err:.3g} vs SDPA {terr:.3g}"


def _ptxas_available() -> bool:
    import importlib.util
    import os
    spec = importlib.util.find_spec("triton")
    root = os.path.dirname(spec.origin) if spec and spec.origin else ""
    return os.path.exists(os.path.join(root, "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas not installed")
def test_gpu_kernels_compile_for_sm80_within_99kb_shared_memory():
    """Each kernel at each dtype and head-dim bucket compiles for sm_80 (no GPU needed) and its
    shared memory fits the 99 KB of sm_86/89 (fp32 64x64 tiles at D = 128 would need 209 KB)."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_triton_sm80_compile.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 3 * 3 * 7  # 3 dtypes x 3 head dims x (4 kernels + 3 packed-row variants)
    over = {k: v for k, v in shared.items() if v > 99 * 1024}
    assert not over, f"shared memory above 99 KB: {over}"
