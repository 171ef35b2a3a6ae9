"""Benchmark: LoRA linear forward+backward overhead (fastft vs PEFT) and the int8 base vs bf16.

    python benchmarks/bench_lora_linear.py [--n 4096] [--dim 2048] [--r 16] [--reps 9]

1. ``overhead`` (fp32 and bf16): time of one LoRA layer's forward+backward (dX, dA, dB) divided
   by the frozen base linear's forward+backward (dX only), for fastft's ``lora_linear`` and PEFT's
   ``LoraLayer`` on the same weights. Targets: fastft <= 1.08 (PEFT measured ~1.17 in fp32).
2. ``int8`` (bf16 run dtype): fastft LoRA layer on the int8 base vs on the bf16 base, time and
   weight memory. Targets: int8 weight bytes <= 0.3x fp32, time <= 1.2x the bf16 path.

``torch.compile`` (unless ``--no-compile``) compiles the eager LoRA formula PEFT runs,
``linear(x, W) + s * linear(linear(x, A), B)``, and joins the overhead case's alternation.

Correctness is checked first (fastft and torch.compile vs PEFT outputs and grads; int8 vs the fp32 reference),
then the variants of a case run alternately, ``--reps`` times; medians and the median of per-rep
ratios are reported. Writes benchmarks/results/lora_linear.{csv,md}.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastft import _backend  # noqa: E402
from fastft.ops.lora_linear import lora_linear, lora_linear_reference, quantize_int8  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def fwd_bwd(fn, x, dy):
    """One forward + backward; returns seconds. x requires grad (dX is computed)."""
    x.grad = None
    t0 = time.perf_counter()
    fn(x).backward(dy)
    return time.perf_counter() - t0


def alternate(variants: dict, x, dy, reps: int) -> dict[str, list[float]]:
    times = {k: [] for k in variants}
    for k, f in variants.items():  # warm-up
        fwd_bwd(f, x, dy)
    for i in range(reps):
        order = list(variants)[i % len(variants):] + list(variants)[:i % len(variants)]  # rotate
        for k in order:
            times[k].append(fwd_bwd(variants[k], x, dy))
    return times


def peft_layer(W: torch.Tensor, A, B, alpha: float, r: int):
    from peft import LoraConfig, inject_adapter_in_model

    lin = nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    holder = nn.Sequential()
    holder.add_module("lin", lin)
    holder = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]), holder)
    layer = holder.lin.to(W.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def eager_lora(x, W, A, B, s):
    """PEFT's LoRA maths in plain PyTorch (dropout 0)."""
    return F.linear(x, W) + s * F.linear(F.linear(x, A), B)


def overhead_case(dtype, n, dim, r, reps, rows, notes, compile_ok=True):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(dim, dim, generator=g) / dim ** 0.5).to(dtype)
    A = nn.Parameter((torch.randn(r, dim, generator=g) / dim ** 0.5).to(dtype))
    B = nn.Parameter((torch.randn(dim, r, generator=g) * 0.01).to(dtype))
    x = (torch.randn(n, dim, generator=g)).to(dtype).requires_grad_(True)
    dy = torch.randn(n, dim, generator=g).to(dtype)
    alpha = 2.0 * r
    s = alpha / r
    peft = peft_layer(W, A.detach(), B.detach(), alpha, r)
    candidates = [("fastft", lambda t: lora_linear(t, W, A, B, s), A, B),
                  ("peft", peft, peft.lora_A["default"].weight, peft.lora_B["default"].weight)]
    if compile_ok:
        t0 = time.perf_counter()
        comp = torch.compile(eager_lora, dynamic=False)
        try:
            comp(x, W, A, B, s).backward(dy)
            candidates.append(("torch.compile", lambda t: comp(t, W, A, B, s), A, B))
            notes.append(f"overhead-{str(dtype).split('.')[-1]}: torch.compile of the eager LoRA formula, first "
                         f"fwd+bwd {time.perf_counter() - t0:.1f} s (compilation)")
        except Exception as e:  # noqa: BLE001 - report and go on without it
            notes.append(f"torch.compile failed ({type(e).__name__}: {str(e)[:120]})")
    # correctness: fastft (and torch.compile) vs PEFT, output and every grad
    out = {}
    for name, fn, a, b in candidates:
        x.grad = a.grad = b.grad = None
        y = fn(x)
        y.backward(dy)
        out[name] = [y.detach().float(), x.grad.float(), a.grad.float(), b.grad.float()]
    for name in out:
        for t_name, p, q in zip(("y", "dx", "dA", "dB"), out[name], out["peft"]):
            rel = ((p - q).norm() / q.norm()).item()
            assert rel < (1e-5 if dtype == torch.float32 else 1e-2), (name, t_name, rel)
    variants = {"base": lambda t: F.linear(t, W), **{name: fn for name, fn, _, _ in candidates}}
    times = alternate(variants, x, dy, reps)
    base = statistics.median(times["base"])
    for k in variants:
        med = statistics.median(times[k])
        per_rep = statistics.median(a / b for a, b in zip(times[k], times["base"]))
        rows.append({"case": f"overhead-{str(dtype).split('.')[-1]}", "variant": k, "median_ms": round(1e3 * med, 1),
                     "min_ms": round(1e3 * min(times[k]), 1), "ratio": round(med / base, 3),
                     "ratio_per_rep_median": round(per_rep, 3), "weight_MiB": round(W.numel() * W.element_size() / 2 ** 20, 2)})


def int8_case(n, dim, r, reps, rows, notes):
    g = torch.Generator().manual_seed(1)
    W32 = torch.randn(dim, dim, generator=g) / dim ** 0.5
    q = quantize_int8(W32)
    Wb = W32.bfloat16()
    A = nn.Parameter((torch.randn(r, dim, generator=g) / dim ** 0.5).bfloat16())
    B = nn.Parameter((torch.randn(dim, r, generator=g) * 0.01).bfloat16())
    x = torch.randn(n, dim, generator=g).bfloat16().requires_grad_(True)
    dy = torch.randn(n, dim, generator=g).bfloat16()
    s = 2.0
    # correctness: int8 path vs the fp32 reference on the dequantised weight (first 256 rows)
    y = lora_linear(x[:256], q, A, B, s)
    ref = lora_linear_reference(x[:256].float(), q, A.float(), B.float(), s)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    notes.append(f"int8 path vs fp32 reference on the dequantised weight: relative error {rel:.2e} (bf16 GEMM)")
    qerr = ((q.dequantize() - W32).norm() / W32.norm()).item()
    notes.append(f"int8 quantisation error ||deq(W) - W|| / ||W|| = {qerr:.2e}")
    variants = {"bf16-base": lambda t: lora_linear(t, Wb, A, B, s), "int8-base": lambda t: lora_linear(t, q, A, B, s)}
    times = alternate(variants, x, dy, reps)
    ref_t = statistics.median(times["bf16-base"])
    mem = {"bf16-base": Wb.numel() * 2, "int8-base": q.nbytes()}
    for k in variants:
        med = statistics.median(times[k])
        per_rep = statistics.median(a / b for a, b in zip(times[k], times["bf16-base"]))
        rows.append({"case": "int8-vs-bf16", "variant": k, "median_ms": round(1e3 * med, 1),
                     "min_ms": round(1e3 * min(times[k]), 1), "ratio": round(med / ref_t, 3),
                     "ratio_per_rep_median": round(per_rep, 3), "weight_MiB": round(mem[k] / 2 ** 20, 2)})
    notes.append(f"int8 weight memory: {q.nbytes() / (W32.numel() * 4):.3f}x fp32, "
                 f"{q.nbytes() / (W32.numel() * 2):.3f}x bf16 (target <= 0.3x fp32)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    import peft
    import transformers

    info = _backend.describe()
    head = (f"machine: {info['processor']}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
            f"peft {peft.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
            f"int8_linear backend: {_backend.choose_backend('int8_linear', 'cpu')}")
    print(head)
    rows, notes = [], []
    load0 = os.getloadavg()[0]
    overhead_case(torch.float32, a.n, a.dim, a.r, a.reps, rows, notes, not a.no_compile)
    overhead_case(torch.bfloat16, a.n, a.dim, a.r, a.reps, rows, notes, not a.no_compile)
    int8_case(a.n, a.dim, a.r, a.reps, rows, notes)
    notes.append(f"1-min load average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f} on "
                 f"{os.cpu_count()} cores (a shared machine: the ratios, not the ms, are the result)")
    os.makedirs(RESULTS, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    with open(os.path.join(RESULTS, "lora_linear.csv"), "w") as f:
        f.write(buf.getvalue())
    md = [f"# LoRA linear forward+backward (N={a.n}, in=out={a.dim}, r={a.r}, {a.reps} alternating reps)", "",
          head, "",
          "`ratio` = median time / median of the case's baseline (`base`: frozen linear fwd+bwd, dX only; "
          "`bf16-base`: fastft LoRA on a bf16 weight); `ratio_per_rep_median` = median of per-rep ratios.", "",
          "| case | variant | median ms | min ms | ratio | per-rep ratio | weight MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['variant']} | {r['median_ms']} | {r['min_ms']} | {r['ratio']} | "
                  f"{r['ratio_per_rep_median']} | {r['weight_MiB']} |")
    md += [""] + [f"- {n}" for n in notes]
    with open(os.path.join(RESULTS, "lora_linear.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
