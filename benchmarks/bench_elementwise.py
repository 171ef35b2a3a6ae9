"""Benchmark: fused RMSNorm / SwiGLU / RoPE (forward + backward) vs eager PyTorch vs torch.compile.

    python benchmarks/bench_elementwise.py [--reps 31] [--no-compile] [--tokens 1024]

Shapes are one SmolLM2-135M layer's at batch 4 x 256 tokens: hidden 576, intermediate 1536,
9 query / 3 KV heads of dim 64. Eager PyTorch runs transformers' formulas (LlamaRMSNorm.forward,
``act_fn(gate) * up``, ``apply_rotary_pos_emb``); torch.compile compiles those same functions.
Correctness is checked first (every variant's output and input grads against the fp32
reference), then the variants are timed alternately (one fwd+bwd each per round), medians.
GB/s counts the bytes a fused fwd+bwd must move (RMSNorm: x, y, dy, dx; SwiGLU: g, u, y; g, u,
dy, dg, du; RoPE: q/k, out, dy, dx), so eager's extra passes show as a lower figure.
Writes benchmarks/results/elementwise.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastft import _backend  # noqa: E402
from fastft.ops.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from fastft.ops.rope import rope, rope_reference  # noqa: E402
from fastft.ops.swiglu import swiglu, swiglu_reference  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HIDDEN, INTER, HQ, HK, HD = 576, 1536, 9, 3, 64


# --- eager PyTorch: transformers' Llama formulas -------------------------------------------------
def eager_rms(x, w, eps=1e-5):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def eager_swiglu(g, u):
    return F.silu(g) * u


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def eager_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# --- problems ------------------------------------------------------------------------------------
def make_problem(op: str, dtype, tokens: int, gen):
    b, t = 4, tokens // 4

    def r(*s):
        return torch.randn(*s, generator=gen).to(dtype)
    if op == "rms_norm":
        x, w = r(b, t, HIDDEN), (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)
        inputs, const = [x, w], []
        grads = [r(b, t, HIDDEN)]
        nbytes = 4 * x.numel() * x.element_size()
        fns = {"fastft": lambda x, w: rms_norm(x, w, 1e-5, forced="cpu"), "eager": eager_rms,
               "ref": lambda x, w: rms_norm_reference(x, w, 1e-5)}
    elif op == "swiglu":
        g, u = r(b, t, INTER) * 2, r(b, t, INTER)
        inputs, const, grads = [g, u], [], [r(b, t, INTER)]
        nbytes = 8 * g.numel() * g.element_size()
        fns = {"fastft": lambda g, u: swiglu(g, u, forced="cpu"), "eager": eager_swiglu,
               "ref": swiglu_reference}
    else:  # rope on HF's layout: (B, T, H, D) projections viewed as (B, H, T, D)
        q, k = r(b, t, HQ, HD).transpose(1, 2), r(b, t, HK, HD).transpose(1, 2)
        inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
        ang = torch.arange(t).float()[:, None] * inv[None]
        emb = torch.cat((ang, ang), -1)[None].expand(b, t, HD)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        inputs, const = [q, k], [cos, sin]
        grads = [r(b, t, HQ, HD).transpose(1, 2), r(b, t, HK, HD).transpose(1, 2)]
        nbytes = 4 * (q.numel() + k.numel()) * q.element_size()
        fns = {"fastft": lambda q, k, c, s: rope(q, k, c, s, forced="cpu"), "eager": eager_rope,
               "ref": rope_reference}
    return inputs, const, grads, nbytes, fns


def fwd_bwd(fn, inputs, const, grads):
    for x in inputs:
        x.grad = None
    out = fn(*inputs, *const)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads)
    return outs


def check(name, fn, inputs, const, grads, ref_fn, dtype, notes, tol16: float = 2 ** -7) -> bool:
    """Output and input grads vs the fp32 reference on fp32 copies: max error relative to the
    largest reference value, against eager PyTorch's own error at this dtype."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fwd_bwd(fn, leaves, const, grads)
    f32 = [x.detach().float().requires_grad_() for x in inputs]
    routs = fwd_bwd(ref_fn, f32, [c.float() for c in const], [g.float() for g in grads])
    errs = []
    for a, b in zip(list(outs) + [x.grad for x in leaves], list(routs) + [x.grad for x in f32]):
        errs.append(((a.float() - b.float()).abs().max() / b.abs().max()).item())
    err = max(errs)
    tol = 1e-5 if dtype == torch.float32 else tol16  # default: one bf16 ulp relative to the max value
    ok = err <= tol
    notes.append(f"{name}: max error vs fp32 reference {err:.2e} relative to max |ref| "
                 f"({'OK' if ok else 'FAIL'}, tol {tol:.3g})")
    return ok


def run_op(op, dtype, args, rows, notes, compile_ok, problem=make_problem, tol16: float = 2 ** -7):
    """Check, then time fastft / eager / torch.compile of ``problem(op, dtype, tokens, gen)``
    alternately (benchmarks/bench_attention.py passes its own problem)."""
    gen = torch.Generator().manual_seed(0)
    inputs, const, grads, nbytes, fns = problem(op, dtype, args.tokens, gen)
    dname = str(dtype).replace("torch.", "")
    # "fastft-<name>": other fastft paths a problem offers (bench_attention.py: the bf16 FMA path)
    variants = {"fastft": fns["fastft"], **{n: f for n, f in fns.items() if n.startswith("fastft-")},
                "eager": fns["eager"]}
    if compile_ok:
        t0 = time.perf_counter()
        try:
            comp = torch.compile(fns["eager"], dynamic=False)
            leaves = [x.detach().clone().requires_grad_() for x in inputs]
            fwd_bwd(comp, leaves, const, grads)
            variants["torch.compile"] = comp
            notes.append(f"{op} {dname}: torch.compile of the eager formula: first fwd+bwd took "
                         f"{time.perf_counter() - t0:.1f} s (compilation; less when inductor's cache is warm)")
        except Exception as e:  # noqa: BLE001 - report and go on without it
            notes.append(f"{op} {dname}: torch.compile failed ({type(e).__name__}: {str(e)[:120]})")
    for name, fn in variants.items():
        if not check(f"{op} {dname} {name}", fn, inputs, const, grads, fns["ref"], dtype, notes, tol16):
            raise SystemExit(f"{op} {dname} {name}: wrong result, not timing")
    leaves = {n: [x.detach().clone().requires_grad_() for x in inputs] for n in variants}
    times = {n: [] for n in variants}
    for n, fn in variants.items():  # warm-up
        for _ in range(3):
            fwd_bwd(fn, leaves[n], const, grads)
    for _ in range(args.reps):
        for n, fn in variants.items():
            t0 = time.perf_counter()
            fwd_bwd(fn, leaves[n], const, grads)
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["eager"])
    for n in variants:
        med = statistics.median(times[n])
        # paired: eager and this variant ran back to back in each round (robust to load swings)
        paired = statistics.median([e / t for e, t in zip(times["eager"], times[n])])
        rows.append({"op": op, "dtype": dname, "variant": n, "median_ms": round(med * 1e3, 3),
                     "min_ms": round(min(times[n]) * 1e3, 3),
                     "speedup_vs_eager": round(base / med, 2), "paired_speedup": round(paired, 2),
                     "min_speedup": round(min(times["eager"]) / min(times[n]), 2),
                     "GB/s": round(nbytes / med / 1e9, 1), "GB/s_min": round(nbytes / min(times[n]) / 1e9, 1)})
        print(rows[-1], flush=True)


def machine() -> str:
    ld = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{_backend._cpu_name()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
            f"python {platform.python_version()}, torch {torch.__version__}; load average {ld} "
            "(shared machine: compare ratios)")


def write_csv(rows: list[dict], name: str) -> None:
    """rows (one dict per variant) -> benchmarks/results/<name>, each row tagged with the machine."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["machine"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "machine": machine()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--ops", default="rms_norm,swiglu,rope")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # one OpenMP runtime: this sets fastft._C's threads too
    if "cpu" not in _backend.available_backends("rms_norm", "cpu"):
        raise SystemExit("fastft._C without the elementwise ops: build it first (see README)")
    rows, notes = [], []
    print(machine(), flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        for op in args.ops.split(","):
            run_op(op, dtype, args, rows, notes, not args.no_compile)
    write_csv(rows, "elementwise.csv")
    md = io.StringIO()
    cmd = "python benchmarks/bench_elementwise.py " + " ".join(sys.argv[1:])
    md.write(f"# Fused elementwise ops, forward + backward (SmolLM2-135M layer shapes, {args.tokens} tokens)\n\n")
    md.write(f"Command: `{cmd.strip()}`\n\nMachine: {machine()}\n\n")
    md.write("Speedups are eager time / variant time: of the medians, the median of per-round paired "
             "ratios, and of the minima (the least-disturbed run of each). GB/s: fused bytes / time.\n\n")
    md.write("| op | dtype | variant | median ms | min ms | speedup (medians) | speedup (paired) | "
             "speedup (minima) | GB/s median | GB/s min |\n")
    md.write("|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        md.write(f"| {r['op']} | {r['dtype']} | {r['variant']} | {r['median_ms']} | {r['min_ms']} | "
                 f"{r['speedup_vs_eager']} | {r['paired_speedup']} | {r['min_speedup']} | {r['GB/s']} | "
                 f"{r['GB/s_min']} |\n")
    md.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    with open(os.path.join(RESULTS, "elementwise.md"), "w") as f:
        f.write(md.getvalue())
    print(md.getvalue())


if __name__ == "__main__":
    main()
