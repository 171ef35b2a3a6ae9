"""Packed rows (several samples per row, a pad tail) in fastft.ops.attention: every backend against
the fp32 reference with the same sample layout, output and every gradient.

Layouts: one sample per row (= causal), all 1-token samples, lengths that cross the kernels' tile
boundaries (CPU 64-row blocks / 8x32 micro-tiles, Triton's 32-row interpreter tiles, CUDA's 32/16),
samples followed by a pad tail (built from position ids + attention mask), and random lengths that
differ per row (built from FlashAttention's cu_seqlens). Tolerances as for the causal kernel:
fp32 equal up to summation order; bf16/fp16 at most 2x PyTorch's own SDPA error in that dtype
(SDPA with the same segments as a boolean mask) plus a small floor. The CUDA kernel runs the same
layouts through tests/test_attention_cuda_emulated.py.
"""
from __future__ import annotations

import pytest
import torch
from test_attention import HAS_BF16_DOT, NAMES, _inputs, _run, needs_cpu

from fastft import _backend
from fastft.ops.attention import _segment_attention_torch, attention_reference, causal_attention
from fastft.ops.segments import (Segments, segments_from_cu_seqlens, segments_from_ids,
                                 segments_from_position_ids)


def _from_lengths(rows: list[list[int]], T: int) -> Segments:
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    for b, lens in enumerate(rows):
        assert sum(lens) == T
        ids[b] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return segments_from_ids(ids)


def _crossing(B, T):
    """Lengths cycling through values that straddle every tile size the backends use."""
    rows = []
    for b in range(B):
        lens, cyc = [], [31, 2, 33, 1, 65, 7, 16][b:] + [31, 2, 33, 1, 65, 7, 16][:b]
        while sum(lens) < T:
            lens.append(min(cyc[len(lens) % len(cyc)], T - sum(lens)))
        rows.append(lens)
    return _from_lengths(rows, T)


def _tail(B, T):
    """Samples of 9 and 17 tokens, then pads (mask 0) to the end of the row; the last row unpadded."""
    pos = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = T if b == B - 1 else min(T, 26)
        p = (list(range(9)) + list(range(17)))[:n] if b < B - 1 else list(range(T))
        pos[b, :n] = torch.tensor(p)
        mask[b, :n] = 1
        pos[b, n:] = torch.arange(T - n)  # as the collator pads: the tail counts up like one more sample
    return segments_from_position_ids(pos, mask)


def _random(B, T, seed=3):
    g = torch.Generator().manual_seed(seed)
    cuts = [0]
    for b in range(B):
        at = b * T
        while at < (b + 1) * T:
            at = min((b + 1) * T, at + int(torch.randint(1, 20, (1,), generator=g)))
            cuts.append(at)
    return segments_from_cu_seqlens(torch.tensor(cuts, dtype=torch.int32), B, T)


LAYOUTS = {
    "one": lambda B, T: _from_lengths([[T]] * B, T),
    "ones": lambda B, T: _from_lengths([[1] * T] * B, T),
    "cross": _crossing,
    "tail": _tail,
    "random": _random,
}


def _ref_grads(q, k, v, dout, seg):
    return _run(lambda a, b, c: attention_reference(a, b, c, segments=seg), *(x.detach().float() for x in (q, k, v)),
                dout.float())


def check_against_reference(ours, q, k, v, dout, seg):
    """Asserts a backend's [out, dq, dk, dv] is within the causal kernel's error budget."""
    ref = _ref_grads(q, k, v, dout, seg)
    if q.dtype == torch.float32:
        for name, a, r in zip(NAMES, ours, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=2e-6 * max(r.abs().max().item(), 1.0), msg=name)
        return
    torch_own = _run(lambda a, b, c: _segment_attention_torch(a, b, c, a.shape[-1] ** -0.5, seg), q, k, v, dout)
    for name, a, t, r in zip(NAMES, ours, torch_own, ref):
        # floor relative to at least 1 (inputs are N(0, 1)): 1-token samples have dq = dk = 0 exactly
        scale = max(r.abs().max().item(), 1.0)
        err, terr = (a - r).abs().max().item(), (t - r).abs().max().item()
        assert err <= 2 * terr + 1e-3 * scale, f"{name}: {err:.3g} vs SDPA {q.dtype} {terr:.3g}"


# ------------------------------------------------------------------------------------------------
# The oracle itself, and the layout builders
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_equals_attention_run_per_sample(layout):
    """The packed reference is what running every sample alone through causal attention gives."""
    B, T = 2, 45
    q, k, v, dout = _inputs((B, 4, 2, T, 8), torch.float32)
    seg = LAYOUTS[layout](B, T)
    packed = _ref_grads(q, k, v, dout, seg)
    alone = [torch.zeros_like(x) for x in packed]
    for b in range(B):
        starts = [i for i in range(T) if int(seg.start[b, i]) == i] + [T]
        for s0, s1 in zip(starts, starts[1:]):
            part = _run(attention_reference, *(x[b:b + 1, :, s0:s1].detach() for x in (q, k, v)),
                        dout[b:b + 1, :, s0:s1])
            for dst, src in zip(alone, part):
                dst[b:b + 1, :, s0:s1] = src
    for name, a, r in zip(NAMES, packed, alone):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=name)


def test_builders_agree_and_check_their_input():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    seg = segments_from_position_ids(pos, mask)
    assert seg.start.tolist() == [[0, 0, 0, 3, 3, 5, 6, 6]]
    assert seg.end.tolist() == [[3, 3, 3, 5, 5, 6, 8, 8]]
    assert seg.start.dtype == seg.end.dtype == torch.int32
    cu, longest = seg.cu_seqlens()
    assert cu.tolist() == [0, 3, 5, 6, 8] and longest == 3
    for other in (segments_from_cu_seqlens(cu, 1, 8), segments_from_ids(torch.tensor([[4, 4, 4, 1, 1, 7, 2, 2]]))):
        assert torch.equal(other.start, seg.start) and torch.equal(other.end, seg.end)
    with pytest.raises(ValueError, match="crosses a row boundary"):
        segments_from_cu_seqlens(torch.tensor([0, 3, 10, 16]), 2, 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        segments_from_cu_seqlens(torch.tensor([0, 3, 3, 8]), 1, 8)
    with pytest.raises(ValueError, match=r"expected \(B, T\) ints"):
        segments_from_position_ids(pos.float())


def test_op_takes_each_description_and_rejects_two():
    q, k, v, _ = _inputs((1, 2, 1, 8, 8), torch.float32)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    a = causal_attention(q, k, v, forced="torch", position_ids=pos)
    b = causal_attention(q, k, v, forced="torch", cu_seqlens=torch.tensor([0, 3, 5, 8]))
    c = causal_attention(q, k, v, forced="torch", segment_ids=torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="give one of"):
        causal_attention(q, k, v, position_ids=pos, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"expected \(B, T\)"):
        causal_attention(q, k, v, segments=segments_from_ids(torch.zeros(2, 8, dtype=torch.long)))


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------
SHAPE = (2, 6, 2, 77, 16)  # B, Hq, Hkv, T (crosses 64-row blocks and 32-row tiles), D
CPU_DTYPES = [pytest.param(torch.float32, True, id="fp32"),
              pytest.param(torch.bfloat16, True, id="bf16-dot",
                           marks=pytest.mark.skipif(not HAS_BF16_DOT, reason="no AVX512-BF16")),
              pytest.param(torch.bfloat16, False, id="bf16-fma"), pytest.param(torch.float16, False, id="fp16")]


@needs_cpu
@pytest.mark.parametrize("dtype,dot", CPU_DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cpu_kernel_matches_reference(layout, dtype, dot):
    ext = _backend.cpu_ext()
    prev = ext.attention_bf16_dot(dot)
    try:
        q, k, v, dout = _inputs(SHAPE, dtype)
        seg = LAYOUTS[layout](SHAPE[0], SHAPE[3])
        ours = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu", segments=seg), q, k, v, dout)
    finally:
        ext.attention_bf16_dot(prev)
    check_against_reference(ours, q, k, v, dout, seg)


@needs_cpu
def test_cpu_one_sample_per_row_is_the_causal_kernel_bit_for_bit():
    q, k, v, dout = _inputs(SHAPE, torch.bfloat16)
    seg = LAYOUTS["one"](SHAPE[0], SHAPE[3])
    packed = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu", segments=seg), q, k, v, dout)
    causal = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu"), q, k, v, dout)
    for name, a, b in zip(NAMES, packed, causal):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_fallback_matches_reference(layout, dtype):
    q, k, v, dout = _inputs(SHAPE, dtype)
    seg = LAYOUTS[layout](SHAPE[0], SHAPE[3])
    ours = _run(lambda a, b, c: causal_attention(a, b, c, forced="torch", segments=seg), q, k, v, dout)
    if dtype == torch.float32:
        check_against_reference(ours, q, k, v, dout, seg)
    else:  # the fallback is the bf16 baseline itself: bound it by the kernel floor only
        for name, a, r in zip(NAMES, ours, _ref_grads(q, k, v, dout, seg)):
            assert (a - r).abs().max().item() <= 2e-2 * max(r.abs().max().item(), 1.0), name


TRITON = "triton" in _backend.available_backends("attention", "cpu")


# fp32 and fp16 dot operands under the interpreter (its bf16 tl.dot is broken; the kernels' UPCAST
# flag covers bf16 there, checked on one layout), small shapes: the interpreter is slow.
@pytest.mark.skipif(not TRITON, reason="triton not installed or TRITON_INTERPRET unset")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_triton_kernel_matches_reference(layout, dtype):
    if dtype == torch.bfloat16 and layout != "cross":
        pytest.skip("bf16 (UPCAST) on one layout")
    shape = (2, 4, 2, 45, 16)
    q, k, v, dout = _inputs(shape, dtype)
    seg = LAYOUTS[layout](shape[0], shape[3])
    ours = _run(lambda a, b, c: causal_attention(a, b, c, forced="triton", segments=seg), q, k, v, dout)
    check_against_reference(ours, q, k, v, dout, seg)


@needs_cpu
def test_a_leak_across_samples_is_caught():
    """The check is not vacuous: plain causal attention on a packed layout fails it."""
    q, k, v, dout = _inputs(SHAPE, torch.float32)
    seg = LAYOUTS["cross"](SHAPE[0], SHAPE[3])
    leaky = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu"), q, k, v, dout)
    with pytest.raises(AssertionError):
        check_against_reference(leaky, q, k, v, dout, seg)


def test_cuda_varlen_glue_with_a_stand_in_kernel(monkeypatch):
    """The CUDA varlen route's glue (cu_seqlens over the flattened B * T tokens, the (B * T, H, D)
    views, the output's (B, H, T, D) view) with a stand-in for torch's FlashAttention varlen op
    that runs the reference per sample (no GPU here): equals the packed reference."""
    from fastft.ops import attention as attn

    calls = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and window_size == (-1, 0)
        calls.append((cu_q.tolist(), max_q))
        out = torch.empty_like(q)
        for s0, s1 in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            part = [x[s0:s1].transpose(0, 1)[None] for x in (q, k, v)]  # (1, H, n, D)
            out[s0:s1] = attention_reference(*part, scale=scale)[0].transpose(0, 1)
        return out

    monkeypatch.setattr(attn, "_varlen_route", lambda: (varlen, {"window_size": (-1, 0)}, True))
    q, k, v, dout = _inputs((2, 4, 2, 45, 16), torch.bfloat16)
    seg = LAYOUTS["random"](2, 45)
    got = _run(lambda a, b, c: attn._varlen_cuda(a, b, c, 0.25, seg), q, k, v, dout)
    ref = _run(lambda a, b, c: attention_reference(a, b, c, scale=0.25, segments=seg), q, k, v, dout)
    assert calls and calls[0][1] == max(b - a for a, b in zip(calls[0][0], calls[0][0][1:]))
    for name, a, r in zip(NAMES, got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0, msg=name)


def test_an_extension_built_before_packed_rows_is_not_handed_them(monkeypatch):
    """A stale fastft._C (no seg_start argument): causal rows still run it; packed rows take the
    pure-PyTorch path (warned), and models do not route packed rows to it."""
    import types

    from fastft.ops import attention as attn

    real = _backend.cpu_ext()
    if real is None or "cpu" not in _backend.available_backends("attention", "cpu"):
        pytest.skip("fastft._C has no attention kernel")
    assert attn._ext_takes_segments(real) and attn.packed_rows_supported("cpu")

    def old_fwd(*a):
        assert len(a) == 16, "a stale extension takes no segment table"
        return real.attention_fwd(*a)

    old_fwd.__doc__ = "Causal attention forward"
    stale = types.SimpleNamespace(attention_fwd=old_fwd, attention_bwd=real.attention_bwd, ops=real.ops)
    monkeypatch.setattr(_backend, "cpu_ext", lambda: stale)
    monkeypatch.setattr(_backend, "_warned", set())
    assert not attn.packed_rows_supported("cpu")
    q, k, v, dout = _inputs((1, 2, 1, 20, 8), torch.float32)
    causal_attention(q, k, v, forced="cpu")  # the old argument list
    seg = LAYOUTS["cross"](1, 20)
    with pytest.warns(RuntimeWarning, match="predates packed rows"):
        out = _run(lambda a, b, c: causal_attention(a, b, c, forced="cpu", segments=seg), q, k, v, dout)
    check_against_reference(out, q, k, v, dout, seg)
