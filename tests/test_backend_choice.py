"""fastft/_backend.py: which backend each op takes on each device, the per-op override, and the
device guard every kernel launcher runs under (checked here by recording it: no GPU needed)."""
from __future__ import annotations

import types

import pytest
import torch

from fastft import _backend

OPS = tuple(_backend.OP_BACKENDS)


@pytest.fixture
def fake_cuda_ext(monkeypatch):
    """fastft._C_cuda as if it were built with every op."""
    ext = types.SimpleNamespace(ops=["adamw", "cross_entropy", "int8_linear", "rms_norm", "swiglu", "rope",
                                     "attention"])
    monkeypatch.setattr(_backend, "cuda_ext", lambda: ext)
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    for op in OPS:
        monkeypatch.delenv("FASTFT_BACKEND_" + op.upper(), raising=False)
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    return ext


def test_cuda_defaults_vendor_gemm_and_attention(fake_cuda_ext):
    """On CUDA the frozen GEMMs (int8_linear) and attention go to the vendor (cuBLAS/SDPA: the
    op's torch path), AdamW to the multi-tensor CUDA kernel, the fused elementwise ops and CE to
    fastft's Triton kernels."""
    got = {op: _backend.choose_backend(op, "cuda") for op in OPS}
    assert got == {"adamw": "cuda", "cross_entropy": "triton", "int8_linear": "torch", "rms_norm": "triton",
                   "swiglu": "triton", "rope": "triton", "attention": "torch"}


def test_cuda_adamw_falls_back_to_triton_without_the_extension(fake_cuda_ext):
    fake_cuda_ext.ops = ["rms_norm"]
    assert _backend.choose_backend("adamw", "cuda") == "triton"


def test_opt_in_to_fastft_gemm_and_attention(fake_cuda_ext, monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND_ATTENTION", "triton")
    monkeypatch.setenv("FASTFT_BACKEND_INT8_LINEAR", "cuda")
    assert _backend.choose_backend("attention", "cuda") == "triton"
    assert _backend.choose_backend("int8_linear", "cuda") == "cuda"
    assert _backend.choose_backend("rms_norm", "cuda") == "triton"  # others untouched
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")  # the global force is an opt-in too
    monkeypatch.delenv("FASTFT_BACKEND_ATTENTION")
    assert _backend.choose_backend("attention", "cuda") == "cuda"
    # an explicit argument beats both
    assert _backend.choose_backend("attention", "cuda", "torch") == "torch"


def test_per_op_override_is_validated(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND_SWIGLU", "tritn")
    with pytest.raises(ValueError, match="FASTFT_BACKEND_SWIGLU='tritn'"):
        _backend.choose_backend("swiglu", "cpu")
    monkeypatch.setenv("FASTFT_BACKEND_SWIGLU", "auto")
    assert _backend.choose_backend("swiglu", "cpu") in ("cpu", "torch")


def test_cpu_choice_unchanged(monkeypatch):
    """CPU: fastest built backend, never the interpreter, vendor rule not applied."""
    for op in OPS:
        monkeypatch.delenv("FASTFT_BACKEND_" + op.upper(), raising=False)
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    want = "cpu" if _backend.cpu_ext() is not None else "torch"
    for op in OPS:
        assert _backend.choose_backend(op, "cpu") == want


def test_env_states_the_path_per_device(fake_cuda_ext):
    table = _backend.ops_by_device()
    assert set(table) == set(OPS)
    assert "cuda: torch = PyTorch SDPA" in table["attention"] and "FASTFT_BACKEND_ATTENTION" in table["attention"]
    assert "cuda: torch = cuBLAS" in table["int8_linear"]
    assert "cuda: cuda" in table["adamw"] and table["rms_norm"].startswith("cpu: ")
    info = _backend.describe()
    assert info["ops_by_device"] == table and set(info["ops"]) == set(OPS)


# ----------------------------------------------------------------------------------------------
# Device guard: every launcher runs under its tensors' device
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def guard_log(monkeypatch):
    log = []
    real = _backend.device_of

    def recording(t):
        log.append(t.device)
        return real(t)

    monkeypatch.setattr(_backend, "device_of", recording)
    return log


needs_triton = pytest.mark.skipif(not ("triton" in _backend.available_backends("rms_norm", "cpu")),
                                  reason="Triton interpreter not available")


@needs_triton
@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rope", "attention", "cross_entropy", "int8_linear", "adamw"])
def test_every_triton_launcher_runs_under_the_device_guard(op, guard_log):
    from fastft.ops.adamw import AdamWGroup, fused_adamw
    from fastft.ops.attention import causal_attention
    from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
    from fastft.ops.lora_linear import lora_linear
    from fastft.ops.rms_norm import rms_norm
    from fastft.ops.rope import rope
    from fastft.ops.swiglu import swiglu

    x = torch.randn(3, 16, requires_grad=True)
    if op == "rms_norm":
        rms_norm(x, torch.ones(16), forced="triton").sum().backward()
    elif op == "swiglu":
        swiglu(x, torch.randn(3, 16), forced="triton").sum().backward()
    elif op == "rope":
        q = torch.randn(1, 2, 3, 8, requires_grad=True)
        qe, ke = rope(q, torch.randn(1, 1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8), forced="triton")
        qe.sum().backward()
    elif op == "attention":
        q = torch.randn(1, 2, 5, 16, requires_grad=True)
        causal_attention(q, torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), forced="triton").sum().backward()
    elif op == "cross_entropy":
        fused_linear_cross_entropy(x, torch.randn(20, 16), torch.tensor([1, 2, 3]), backend="triton").backward()
    elif op == "int8_linear":
        lora_linear(x, torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2), 1.0,
                    backend="triton").sum().backward()
    else:
        p = torch.randn(10)
        g = AdamWGroup([p], [torch.randn(10)], [torch.zeros(10)], [torch.zeros(10)], [], [None],
                       [torch.zeros(())], 1e-3, 0.9, 0.999, 1e-8, 0.0)
        fused_adamw([g], max_grad_norm=1.0, forced="triton")
    assert guard_log and all(d == torch.device("cpu") for d in guard_log)
    if op in ("rms_norm", "swiglu", "rope", "attention", "int8_linear"):
        assert len(guard_log) >= 2  # forward and backward


def test_device_of_selects_the_tensors_gpu(monkeypatch):
    """On a CUDA tensor the guard is torch.cuda.device(tensor.device) (faked: no GPU here)."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or types.SimpleNamespace(
        __enter__=lambda s: None, __exit__=lambda s, *a: None))
    fake = types.SimpleNamespace(device=torch.device("cuda", 1))
    _backend.device_of(fake)
    assert entered == [torch.device("cuda", 1)]
    assert _backend.device_of(torch.zeros(1)).__class__.__name__ == "nullcontext"
