"""FusedAdamW / fused clipping vs torch.optim.AdamW + torch.nn.utils.clip_grad_norm_.

Every backend available on this machine (cpu C++, triton under TRITON_INTERPRET=1, torch
reference) runs the same random problems: several param groups with odd sizes (1, 37, 1003,
65537, and an empty tensor), params that sometimes have no grad, 50+ steps. fp32 must agree with
torch to 1e-6 relative (normwise per tensor, and elementwise with a 1e-6 floor); bf16 with fp32
master weights must stay within 2x of torch's own bf16 AdamW error against an fp32 run.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastft import _backend
from fastft.errors import ConfigError, UserError
from fastft.ops.adamw import clip_grad_norm_, grad_norm
from fastft.optim import FusedAdamW

SIZES = (1, 37, 1003, 65537, 0)
TRITON_SIZES = (1, 37, 1003, 5000, 0)  # the interpreter is ~100x slower: keep it small
BACKENDS = [b for b in ("cpu", "triton", "torch") if b in _backend.available_backends("adamw", "cpu")]


def _make(sizes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in sizes]


def _groups(ps, **extra):
    # three groups with different hyperparameters; every group keeps its own lr/wd/betas
    return [{"params": ps[:2], **extra},
            {"params": ps[2:4], "lr": 3e-3, "weight_decay": 0.1, "betas": (0.8, 0.99), **extra},
            {"params": ps[4:], "lr": 5e-3, "eps": 1e-6}]


def _grads(ps, step, gen, scale=0.1):
    out = []
    for i, p in enumerate(ps):
        if (i + step) % 5 == 1:  # this param gets no grad on this step
            out.append(None)
        else:
            out.append(torch.randn(p.shape, generator=gen) * scale * (1 + i))
    return out


def _set(ps, grads, dtype=None):
    for p, g in zip(ps, grads):
        p.grad = None if g is None else g.to(dtype or p.dtype).clone()


def assert_fp32_close(actual, expected, what=""):
    """1e-6 relative: max error <= 1e-6 * max|expected| per tensor, and elementwise rtol 1e-6
    with an absolute floor of 1e-6 * max|expected| (values crossing zero)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1e-30).item()
    err = (actual - expected).abs().max().item()
    assert err <= 1e-6 * scale, f"{what}: max abs error {err:.3g} > 1e-6 * {scale:.3g}"
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale, msg=what)


def _compare_state(ours, ref, ps_ours, ps_ref, keys=("exp_avg", "exp_avg_sq")):
    """Params and each state key compared as one concatenated vector (1e-6 relative to its max):
    a 1-element moment can be a near-cancelled sum of grads, where ulp-level differences of the
    clip coefficient show up as large elementwise relative errors."""
    assert_fp32_close(torch.cat([a.detach().float().flatten() for a in ps_ours]),
                      torch.cat([b.detach().float().flatten() for b in ps_ref]), "params")
    for i, (a, b) in enumerate(zip(ps_ours, ps_ref)):
        sa, sb = ours.state.get(a, {}), ref.state.get(b, {})
        assert bool(sa) == bool(sb), f"param {i}: state presence differs"
        if sb:
            assert float(sa["step"]) == float(sb["step"]), f"param {i} step"
    for k in keys:
        pairs = [(ours.state[a][k], ref.state[b][k]) for a, b in zip(ps_ours, ps_ref) if k in ref.state.get(b, {})]
        assert pairs, k
        assert_fp32_close(torch.cat([x.flatten().float() for x, _ in pairs]),
                          torch.cat([y.flatten().float() for _, y in pairs]), k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [None, 1.0, 1e6])
def test_matches_torch_adamw(backend, max_norm):
    sizes = TRITON_SIZES if backend == "triton" else SIZES
    ps, ref = _make(sizes), _make(sizes)
    opt = FusedAdamW(_groups(ps), lr=1e-2, weight_decay=0.01, max_grad_norm=max_norm, backend=backend)
    topt = torch.optim.AdamW(_groups(ref), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for step in range(52):
        grads = _grads(ps, step, gen)
        _set(ps, grads)
        _set(ref, grads)
        opt.step()
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
            assert_fp32_close(opt.last_grad_norm, norm, f"norm at step {step}")
        else:
            assert opt.last_grad_norm is None
        topt.step()
    _compare_state(opt, topt, ps, ref)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lr", ["float", "tensor"])
def test_amsgrad_maximize_lr_scheduler(backend, lr):
    sizes = TRITON_SIZES if backend == "triton" else SIZES
    steps = 20 if backend == "triton" else 50
    ps, ref = _make(sizes), _make(sizes)
    kw = dict(lr=torch.tensor(2e-2) if lr == "tensor" else 2e-2, weight_decay=0.05, amsgrad=True,
              maximize=True)
    opt = FusedAdamW(_groups(ps), max_grad_norm=0.5, backend=backend, **kw)
    topt = torch.optim.AdamW(_groups(ref), **kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=steps)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=2e-2, total_steps=steps)
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        grads = _grads(ps, step, gen)
        _set(ps, grads)
        _set(ref, grads)
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref, 0.5)
        topt.step()
        sched.step()
        tsched.step()
    _compare_state(opt, topt, ps, ref, keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in topt.param_groups]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,fmt", [(torch.bfloat16, "fp32"), (torch.bfloat16, "split"),
                                       (torch.float16, "split")])  # fp16: always a full fp32 master
def test_low_precision_master_weights(backend, dtype, fmt):
    """bf16/fp16 params + fp32 masters (mixed with an fp32 param in the same group) against an
    fp32 run: error at most 2x torch.optim.AdamW's own error when it runs in that dtype."""
    sizes = TRITON_SIZES if backend == "triton" else SIZES
    steps = 20 if backend == "triton" else 50
    fp32 = _make(sizes)
    init_err = [(p.detach().to(dtype).float() - p.detach()).abs().max().item() if p.numel() else 0.0
                for p in fp32]
    low = [p if i == 0 else torch.nn.Parameter(p.detach().to(dtype)) for i, p in enumerate(_make(sizes))]
    # torch's own low-precision AdamW as the error budget; in fp16 it diverges to NaN
    # (eps=1e-8 and v underflow), so fp16 gets the bf16 budget, fp16 being the finer format
    budget_dtype = torch.bfloat16
    torch_low = [torch.nn.Parameter(p.detach().to(budget_dtype)) for p in _make(sizes)]
    kw = dict(lr=1e-2, weight_decay=0.01)
    ref = torch.optim.AdamW(_groups(fp32), **kw)
    opt = FusedAdamW(_groups(low), master_weights=True, master_format=fmt, max_grad_norm=5.0,
                     backend=backend, **kw)
    tlow = torch.optim.AdamW(_groups(torch_low), **kw)
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        grads = _grads(fp32, step, gen)
        _set(fp32, grads)
        _set(low, grads)
        _set(torch_low, grads)
        torch.nn.utils.clip_grad_norm_(fp32, 5.0)
        ref.step()
        opt.step()
        torch.nn.utils.clip_grad_norm_(torch_low, 5.0)
        tlow.step()
    for i, (a, t, r) in enumerate(zip(low, torch_low, fp32)):
        if r.numel() == 0:
            continue
        st = opt.state[a]
        assert st["exp_avg"].dtype == torch.float32
        if a.dtype != torch.float32:
            split = dtype == torch.bfloat16 and fmt == "split"
            assert ("master_lo" in st) == split and ("master_param" in st) == (not split)
            master = opt.master_weight(a)
            assert master.dtype == torch.float32
            ties = (master.view(torch.int32) & 0xFFFF) == 0x8000 if split else torch.zeros_like(master, dtype=torch.bool)
            assert torch.equal(a.detach()[~ties], master.to(dtype)[~ties]), f"param {i} is not round(master)"
            ours = (master - r.detach()).abs().max().item()
            theirs = (t.detach().float() - r.detach()).abs().max().item()
            print(f"param {i} {dtype}: master err {ours:.3g}, torch bf16 err {theirs:.3g}")
            assert ours <= 2 * theirs + 1e-6, f"param {i}: {ours:.3g} vs torch bf16 {theirs:.3g}"
            # a real fp32 master: beyond the rounding of the initial values (the fp32 run starts
            # unrounded) only the rounded grads perturb it
            assert ours <= init_err[i] + 1e-3 * r.detach().abs().max().item()


def test_low_precision_without_master_rounds_each_step():
    """master_weights=False: the update is computed in fp32 from the bf16 value and rounded."""
    p = torch.nn.Parameter(torch.randn(1003).to(torch.bfloat16))
    q = torch.nn.Parameter(p.detach().float().clone())
    opt = FusedAdamW([p], lr=1e-2, backend="cpu")
    ref = FusedAdamW([q], lr=1e-2, backend="torch")
    g = torch.randn(1003)
    p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    opt.step()
    ref.step()
    assert "master_param" not in opt.state[p]
    assert torch.equal(p.detach(), q.detach().to(torch.bfloat16))


def test_fp16_bf16_conversions_match_torch():
    """The C++ round-to-nearest-even conversions (normal, subnormal, huge, zero) equal torch's:
    after a zero-lr step the low-precision param must equal round(master) bit for bit (fp32
    masters: split masters round ties away, tests/test_adamw_split_master.py)."""
    vals = torch.cat([torch.logspace(-9, 4.8, 4001), -torch.logspace(-9, 4.8, 4001),
                      torch.tensor([0.0, 6.1e-5, 6.0e-8, 65504.0, 1e-30])])
    for dtype in (torch.float16, torch.bfloat16):
        p = torch.nn.Parameter(vals.to(dtype))
        opt = FusedAdamW([p], lr=1e-3, weight_decay=0.0, master_weights=True, master_format="fp32",
                         backend="cpu")
        opt.state[p]["master_param"] = vals.clone()  # values not representable in dtype
        opt.state[p]["step"] = torch.tensor(0.0)
        opt.state[p]["exp_avg"] = torch.zeros_like(vals)
        opt.state[p]["exp_avg_sq"] = torch.zeros_like(vals)
        p.grad = torch.zeros_like(p)  # zero grad: the update is exactly 0
        opt.step()
        assert torch.equal(opt.state[p]["master_param"], vals)
        assert torch.equal(p.detach().view(torch.int16), vals.to(dtype).view(torch.int16)), dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trips(backend):
    sizes = TRITON_SIZES if backend == "triton" else SIZES
    gen = torch.Generator().manual_seed(4)
    grads = [_grads(_make(sizes), s, gen) for s in range(12)]

    def run(opt, ps, steps):
        for s in steps:
            _set(ps, grads[s])
            opt.step()

    # fastft -> torch
    ps = _make(sizes)
    opt = FusedAdamW(_groups(ps, amsgrad=True), lr=1e-2, backend=backend)
    run(opt, ps, range(6))
    sd = copy.deepcopy(opt.state_dict())
    tps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    topt = torch.optim.AdamW(_groups(tps, amsgrad=True), lr=1e-2)
    topt.load_state_dict(sd)
    run(opt, ps, range(6, 12))
    run(topt, tps, range(6, 12))
    _compare_state(opt, topt, ps, tps, keys=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))

    # torch -> fastft
    tps = _make(sizes)
    topt = torch.optim.AdamW(_groups(tps), lr=1e-2)
    run(topt, tps, range(6))
    ps = [torch.nn.Parameter(p.detach().clone()) for p in tps]
    opt = FusedAdamW(_groups(ps), lr=1e-2, backend=backend)
    opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    run(opt, ps, range(6, 12))
    run(topt, tps, range(6, 12))
    _compare_state(opt, topt, ps, tps)


@pytest.mark.parametrize("fmt", ["fp32", "split"])
def test_state_dict_keeps_fp32_master_and_moments(fmt):
    ps = _make(SIZES, torch.bfloat16)
    opt = FusedAdamW(ps, lr=1e-2, master_weights=True, master_format=fmt, backend="cpu")
    gen = torch.Generator().manual_seed(5)
    for s in range(3):
        _set(ps, _grads(ps, s, gen))
        opt.step()
    sd = opt.state_dict()
    master_key = "master_lo" if fmt == "split" else "master_param"
    assert set(sd["state"][2]) == {"step", "exp_avg", "exp_avg_sq", master_key}
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = FusedAdamW(ps2, lr=1e-2, master_weights=True, master_format=fmt, backend="cpu")
    opt2.load_state_dict(copy.deepcopy(sd))  # torch's loader would round these to bf16
    for a, b in zip(ps, ps2):
        for k in ("exp_avg", "exp_avg_sq", master_key):
            if k in opt.state[a]:
                assert opt2.state[b][k].dtype == (torch.int16 if k == "master_lo" else torch.float32)
                assert torch.equal(opt.state[a][k], opt2.state[b][k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_skips_step(backend, bad):
    sizes = TRITON_SIZES if backend == "triton" else SIZES
    ps, ref = _make(sizes), _make(sizes)
    opt = FusedAdamW(_groups(ps), lr=1e-2, max_grad_norm=1.0, backend=backend)
    topt = torch.optim.AdamW(_groups(ref), lr=1e-2)
    gen = torch.Generator().manual_seed(6)
    for step in range(8):
        grads = _grads(ps, step, gen)
        _set(ps, grads)
        if step == 3:  # one bad element in one param: nothing may change anywhere
            before = copy.deepcopy((ps, opt.state_dict()))
            ps[2].grad[7] = bad
            opt.step()
            assert opt.skipped_steps == 1
            assert not torch.isfinite(opt.last_grad_norm)
            after_sd = opt.state_dict()
            for p, q in zip(ps, before[0]):
                assert torch.equal(p, q)
            for k, st in before[1]["state"].items():
                for key, val in st.items():
                    assert torch.equal(after_sd["state"][k][key], val), (k, key)
            continue
        _set(ref, grads)
        opt.step()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        topt.step()
    _compare_state(opt, topt, ps, ref)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_found_inf(backend):
    """GradScaler protocol: grads divided by grad_scale inside the step; found_inf skips."""
    sizes = TRITON_SIZES if backend == "triton" else SIZES
    ps, ref = _make(sizes), _make(sizes)
    opt = FusedAdamW(_groups(ps), lr=1e-2, max_grad_norm=1.0, backend=backend)
    topt = torch.optim.AdamW(_groups(ref), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    for step in range(6):
        grads = _grads(ps, step, gen)
        _set(ps, [None if g is None else g * 1024.0 for g in grads])
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(float(step == 2))
        opt.step()
        del opt.grad_scale, opt.found_inf
        if step == 2:
            continue
        _set(ref, grads)
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        assert_fp32_close(opt.last_grad_norm, norm, "unscaled norm")
        topt.step()
    _compare_state(opt, topt, ps, ref)
    assert opt.skipped_steps == 1


def test_torch_grad_scaler_drives_fused_step():
    p = torch.nn.Parameter(torch.randn(1003))
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = FusedAdamW([p], lr=0.1, backend="cpu"), torch.optim.AdamW([q], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        scaler.scale((p ** 2).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        (q ** 2).sum().backward()
        ref.step()
        ref.zero_grad()
    assert_fp32_close(p, q, "param")
    p.grad = torch.full_like(p, float("inf"))
    before = p.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), before) and opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0 ** 9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_norm_matches_torch(backend, norm_type, dtype):
    sizes = TRITON_SIZES if backend == "triton" else SIZES
    ps, ref = _make(sizes, dtype), _make(sizes, dtype)
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(p.shape, generator=gen) for p in ps]
    grads[1] = None
    _set(ps, grads)
    _set(ref, grads)
    if norm_type == float("inf"):  # torch's inf-norm raises on an empty grad; ours skips it
        ref = [q for q in ref if q.numel()]
    for foreach in (None, False):
        a = clip_grad_norm_(ps, 0.5, norm_type, foreach=foreach, forced=backend)
        b = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type, foreach=foreach)
        if dtype == torch.float32:
            assert_fp32_close(a, b, "norm")
            for p, q in zip(ps, ref):
                if q.grad is not None:
                    assert_fp32_close(p.grad, q.grad, "clipped grad")
        else:  # ours accumulates in fp64 and returns fp32; torch returns a bf16 norm
            exact = torch.linalg.vector_norm(torch.cat([g.to(dtype).double().flatten() for g in grads
                                                        if g is not None]), norm_type)
            assert abs(a.double() - exact) <= 1e-6 * exact
            assert abs(a.double() - exact) <= abs(b.double() - exact) + 1e-6 * exact
            for p, q in zip(ps, ref):
                if q.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1.6e-2, atol=1e-5)
        _set(ps, grads)
        _set(ref, grads)


def test_clip_grad_norm_errors_and_edge_cases():
    p = torch.nn.Parameter(torch.randn(37))
    p.grad = torch.randn(37)
    p.grad[3] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert torch.isnan(clip_grad_norm_([p], 1.0))
    assert clip_grad_norm_([torch.nn.Parameter(torch.randn(3))], 1.0).item() == 0.0  # no grads
    z = torch.nn.Parameter(torch.randn(0))
    z.grad = torch.randn(0)
    assert clip_grad_norm_(z, 1.0).item() == 0.0
    # single large tensor: fp64 accumulation is exact to fp32 rounding
    g = torch.randn(2_000_003)
    assert_fp32_close(grad_norm([g], forced="cpu"), g.double().norm().float(), "grad_norm")


def test_no_grads_and_zero_size_params():
    ps = [torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(torch.randn(5))]
    opt = FusedAdamW(ps, max_grad_norm=1.0, backend="cpu")
    opt.step()  # no grads at all: no-op
    assert len(opt.state) == 0
    ps[0].grad = torch.randn(0)
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 1.0 and opt.last_grad_norm.item() == 0.0


def test_bad_inputs_raise_clear_errors():
    p = torch.nn.Parameter(torch.randn(4, 6))
    for kw, frag in [(dict(lr=-1.0), "lr=-1.0"), (dict(betas=(1.0, 0.9)), "betas[0]=1.0"),
                     (dict(betas=(0.9, -0.1)), "betas[1]=-0.1"), (dict(eps=-1e-8), "eps"),
                     (dict(weight_decay=-0.1), "weight_decay"), (dict(max_grad_norm=-1.0), "max_grad_norm"),
                     (dict(lr=float("nan")), "lr=nan"), (dict(lr=torch.tensor(-1e-3)), "lr=-0.001"),
                     (dict(lr=torch.tensor([1e-3, 2e-3])), "1 element")]:
        with pytest.raises(ConfigError, match=frag.replace("[", r"\[").replace("]", r"\]")):
            FusedAdamW([p], **kw)
    with pytest.raises(ConfigError, match="param group 1"):
        FusedAdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.randn(2))], "lr": -2.0}])

    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(UserError, match="sparse gradient"):
        FusedAdamW(emb.parameters(), backend="cpu").step()

    nc = torch.nn.Parameter(torch.randn(6, 4).t())
    nc.grad = torch.randn(4, 6)
    with pytest.raises(UserError, match="not contiguous"):
        FusedAdamW([nc], backend="cpu").step()

    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))
    a.grad, b.grad = torch.randn(3), torch.randn(3, device="meta")
    with pytest.raises(UserError, match="group 0 has parameters on cpu"):
        FusedAdamW([a, b], backend="cpu").step()

    d = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    d.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(UserError, match="float64"):
        FusedAdamW([d], backend="cpu").step()

    p.grad = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="backend 'cuda' requested"):
        FusedAdamW([p], backend="cuda").step()


def test_auto_backend_is_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    expected = "cpu" if "cpu" in BACKENDS else "torch"
    assert _backend.choose_backend("adamw", "cpu") == expected


def test_replaced_state_tensor_is_rechecked():
    """Raw pointers are cached between steps; a state tensor replaced by the user (here with the
    wrong dtype) must be re-validated and converted, never written through a stale pointer."""
    p, q = torch.nn.Parameter(torch.randn(37)), torch.nn.Parameter(torch.randn(37))
    p.grad, q.grad = torch.randn(37), torch.randn(37)
    opt = FusedAdamW([p, q], lr=1e-2, backend="cpu")
    opt.step()
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].to(torch.bfloat16)
    ref = FusedAdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-2, backend="torch")
    rp = ref.param_groups[0]["params"][0]
    ref.state[rp].update({k: v.float().clone() for k, v in opt.state[p].items()})
    rp.grad = p.grad.clone()
    opt.step()
    ref.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert_fp32_close(p, rp, "param after state replacement")


@pytest.mark.parametrize("master", [False, "fp32", "split"])
def test_cpu_kernel_multithreaded_chunks(master):
    """>256K elements: the C++ kernel splits 32K-element chunks over OpenMP threads (the small
    problems above run on one thread). Must equal the reference backend."""
    if "cpu" not in BACKENDS:
        pytest.skip("fastft._C not built")
    dtype = torch.bfloat16 if master else torch.float32
    sizes = (700_001, 3, 300_000)
    ps, ref = _make(sizes, dtype), _make(sizes, dtype)
    kw = dict(lr=1e-2, max_grad_norm=1.0, master_weights=bool(master), master_format=master or "split")
    opt = FusedAdamW(ps, backend="cpu", **kw)
    topt = FusedAdamW(ref, backend="torch", **kw)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        _set(ps, grads)
        _set(ref, grads)
        opt.step()
        topt.step()
        assert_fp32_close(opt.last_grad_norm, topt.last_grad_norm, "norm")
    if not master:
        _compare_state(opt, topt, ps, ref)
        return
    # bf16 params: the fp32 masters agree to 1e-6 (the backends' clip coefficients differ by an
    # ulp), so a master next to a bf16 rounding boundary may round differently: compare the
    # masters, and each param against its own master's rounding
    for a, b in zip(ps, ref):
        assert float(opt.state[a]["step"]) == float(topt.state[b]["step"]) == 3.0
    for k in ("exp_avg", "exp_avg_sq"):
        assert_fp32_close(torch.cat([opt.state[a][k] for a in ps]), torch.cat([topt.state[b][k] for b in ref]), k)
    ma = torch.cat([opt.master_weight(a) for a in ps])
    assert_fp32_close(ma, torch.cat([topt.master_weight(b) for b in ref]), "master")
    pa = torch.cat([a.detach() for a in ps])
    if master == "split":
        ties = (ma.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(pa[~ties], ma.to(dtype)[~ties])
    else:
        assert torch.equal(pa, ma.to(dtype))
