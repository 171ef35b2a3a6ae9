"""Benchmark: fused linear cross-entropy vs eager F.linear + F.cross_entropy (forward+backward).

Correctness first (fastft vs eager on the same inputs), then, per shape and dtype, in one
process, alternating: fastft / eager / the two bare GEMMs eager must do (logits = h @ W^T and
dHidden = dlogits @ W, the floor of any exact method) / optionally torch.compile(eager).
The weight is frozen (fine-tuning with LoRA or a frozen head: dHidden only), as in the issue's
targets. Peak memory beyond the inputs: a fresh subprocess per variant, RSS high-water mark
(VmHWM) minus the RSS once the inputs exist.

    python benchmarks/bench_fused_linear_cross_entropy.py            # both shapes, fp32 + bf16
    python benchmarks/bench_fused_linear_cross_entropy.py --quick    # small shape only
Results: benchmarks/results/fused_linear_cross_entropy.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(4096, 576, 49152), (4096, 2048, 128256)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype).mul_(H ** -0.5)
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def run_fastft(h, w, y):
    from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
    hh = h.detach().requires_grad_()
    loss = fused_linear_cross_entropy(hh, w, y)
    loss.backward()
    return loss.detach(), hh.grad


def run_eager(h, w, y):
    hh = h.detach().requires_grad_()
    loss = F.cross_entropy(F.linear(hh, w).float(), y)
    loss.backward()
    return loss.detach(), hh.grad


def run_bare(h, w, y):
    logits = h @ w.t()
    dh = logits @ w
    return None, dh


_compiled = None


def run_compile(h, w, y):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(lambda a, b, c: F.cross_entropy(F.linear(a, b).float(), c))
    hh = h.detach().requires_grad_()
    loss = _compiled(hh, w, y)
    loss.backward()
    return loss.detach(), hh.grad


VARIANTS = {"fastft": run_fastft, "eager": run_eager, "bare_gemms": run_bare, "compile": run_compile}


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def rss_now_kb() -> int:
    return _status_kb("VmRSS:")


def memory_child(variant, N, H, V, dt):
    """Runs in a fresh process: prints the peak RSS beyond the inputs, in MB."""
    h, w, y = make_inputs(N, H, V, DTYPES[dt])
    import fastft.ops.fused_linear_cross_entropy  # noqa: F401  (imports are not the op's memory)
    base = rss_now_kb()
    VARIANTS[variant](h, w, y)
    # VmHWM (this process image's RSS high-water mark), not ru_maxrss: on Linux ru_maxrss survives
    # fork+exec, so every child reported the parent's 2.5 GB peak (first run's memory column).
    peak = _status_kb("VmHWM:")
    print(json.dumps({"extra_mb": (peak - base) / 1024}))


def measure_memory(variant, N, H, V, dt):
    cmd = [sys.executable, __file__, "--memory-child", variant, str(N), str(H), str(V), dt]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(eager)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--memory-child", nargs=5)
    a = ap.parse_args()
    if a.memory_child:
        v, N, H, V, dt = a.memory_child
        memory_child(v, int(N), int(H), int(V), dt)
        return
    from fastft import _backend
    info = _backend.describe()
    machine = (f"{info['processor']}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"threads {torch.get_num_threads()}, python {platform.python_version()}, "
               f"fastft backend {_backend.choose_backend('cross_entropy', 'cpu')}")
    print(machine)
    variants = ["fastft", "eager", "bare_gemms"] + (["compile"] if a.compile else [])
    rows = []
    shapes = SHAPES[:1] if a.quick else SHAPES
    for (N, H, V) in shapes:
        for dt in DTYPES:
            h, w, y = make_inputs(N, H, V, DTYPES[dt])
            # correctness first
            lf, gf = run_fastft(h, w, y)
            le, ge = run_eager(h, w, y)
            lerr = abs(lf.item() - le.item())
            gerr = ((gf.float() - ge.float()).abs().max() / ge.float().abs().max()).item()
            tol = 1e-4 if dt == "fp32" else 5e-2
            print(f"N={N} H={H} V={V} {dt}: loss {lf.item():.5f} vs eager {le.item():.5f}, "
                  f"dh rel err {gerr:.2e}")
            assert lerr < tol * max(1.0, abs(le.item())) and gerr < tol, "fastft disagrees with eager"
            del gf, ge
            reps = a.reps if V < 100000 else max(1, a.reps - 1)
            times = {v: [] for v in variants}
            for _ in range(reps):
                for v in variants:  # alternating
                    t = time.perf_counter()
                    VARIANTS[v](h, w, y)
                    times[v].append(time.perf_counter() - t)
            del h, w, y
            mem = {v: measure_memory(v, N, H, V, dt) for v in variants}
            med = {v: statistics.median(times[v]) for v in variants}
            for v in variants:
                rows.append(dict(N=N, H=H, V=V, dtype=dt, variant=v, median_s=round(med[v], 3),
                                 reps=reps, vs_eager=round(med[v] / med["eager"], 3),
                                 vs_bare_gemms=round(med[v] / med["bare_gemms"], 3),
                                 extra_peak_mb=round(mem[v], 1),
                                 mem_vs_eager=round(mem[v] / mem["eager"], 3)))
                print(rows[-1])
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "fused_linear_cross_entropy.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    with open(os.path.join(HERE, "results", "fused_linear_cross_entropy.md"), "w") as f:
        f.write("# Fused linear cross-entropy, forward+backward (weight frozen)\n\n")
        f.write(f"Machine: {machine}. Command: `python benchmarks/bench_fused_linear_cross_entropy.py"
                f"{' --quick' if a.quick else ''}`. Medians of alternating runs; peak = RSS "
                "high-water mark beyond the inputs in a fresh process per variant.\n\n")
        f.write("Targets (issue 3): time <= 1.10x bare_gemms, extra peak memory <= 0.10x eager.\n\n")
        f.write("| N | H | V | dtype | variant | median s | reps | x eager | x bare GEMMs | "
                "extra peak MB | mem x eager |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[k]) for k in r) + " |\n")
        if not a.compile:
            f.write("\ntorch.compile(eager) was not timed in this run (pass --compile).\n")


if __name__ == "__main__":
    main()
