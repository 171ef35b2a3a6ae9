"""Chunk-size sweep of the fused linear cross-entropy (forward+backward, frozen weight).

Measures the choice behind ``fastft.ops.fused_linear_cross_entropy.CHUNK_BUDGET_BYTES``: for
each dtype, fastft at several fixed chunk sizes and at the default, alternating within each rep,
medians. The loss of every chunk size is checked against the default's before timing.

    python benchmarks/sweep_ce_chunk.py [--n 4096 --h 576 --v 49152 --reps 3]
Results: benchmarks/results/ce_chunk_sweep.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch

from fastft.ops.fused_linear_cross_entropy import default_chunk_size, fused_linear_cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))


def fwd_bwd(h, w, y, chunk):
    hh = h.detach().requires_grad_()
    t0 = time.perf_counter()
    loss = fused_linear_cross_entropy(hh, w, y, chunk_size=chunk)
    loss.backward()
    return time.perf_counter() - t0, loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=576)
    ap.add_argument("--v", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", default="128,256,512,1024,2048")
    a = ap.parse_args()
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(a.n, a.h, generator=g, dtype=dtype)
        w = torch.randn(a.v, a.h, generator=g, dtype=dtype).mul_(a.h ** -0.5)
        y = torch.randint(0, a.v, (a.n,), generator=g)
        default = default_chunk_size(a.n, a.v, dtype)
        sizes = sorted({int(c) for c in a.chunks.split(",")} | {default})
        ref = fwd_bwd(h, w, y, default)[1]
        for c in sizes:  # correctness (and warm-up) before timing
            loss = fwd_bwd(h, w, y, c)[1]
            assert torch.allclose(loss, ref, rtol=1e-4), (name, c, loss.item(), ref.item())
        times = {c: [] for c in sizes}
        for _ in range(a.reps):
            for c in sizes:
                times[c].append(fwd_bwd(h, w, y, c)[0])
        base = statistics.median(times[default])
        for c in sizes:
            med = statistics.median(times[c])
            buf_mb = c * a.v * torch.tensor([], dtype=dtype).element_size() / 2 ** 20
            rows.append({"dtype": name, "chunk": c, "default": c == default, "buffer_MiB": round(buf_mb, 1),
                         "median_s": round(med, 3), "vs_default": round(med / base, 3)})
            print(rows[-1], flush=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "ce_chunk_sweep.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]) + ["machine"])
        wr.writeheader()
        for r in rows:
            wr.writerow({**r, "machine": machine})
    md = [f"# Fused CE chunk-size sweep (N={a.n}, H={a.h}, V={a.v}, fwd+bwd, frozen weight, "
          f"{a.reps} alternating reps)", "", f"Machine: {machine}", "",
          "| dtype | chunk rows | default | chunk buffer MiB | median s | vs default |", "|---|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['chunk']} | {'yes' if r['default'] else ''} | {r['buffer_MiB']} | "
           f"{r['median_s']} | {r['vs_default']} |" for r in rows]
    with open(os.path.join(HERE, "results", "ce_chunk_sweep.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
