"""Benchmark: fastft causal attention (forward + backward) vs torch SDPA vs torch.compile.

    python benchmarks/bench_attention.py [--reps 21] [--no-compile] [--tokens 1024] [--threads N]

Shape: one SmolLM2-135M layer at batch 4 x 256 tokens (9 query / 3 KV heads of dim 64, causal,
no mask), in HF's layout ((B, T, H, D) projections viewed as (B, H, T, D)). "eager" is what HF
runs by default: ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` (torch's CPU
flash kernel); torch.compile compiles that same call. Correctness first (output and q/k/v grads
against the fp32 reference), then the variants alternate, one fwd+bwd each per round; medians.
GFLOP/s counts the useful FLOPs of the causal half of the T x T x D products (``causal_flops``).
Writes benchmarks/results/attention.{csv,md}.
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_elementwise import HD, HK, HQ, machine, run_op, write_csv  # noqa: E402
from fastft import _backend  # noqa: E402
from fastft.ops.attention import attention_reference, causal_attention  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def causal_flops(b: int, t: int) -> float:
    """Useful FLOPs of a causal fwd+bwd: forward q.k and p.v, backward the recomputed q.k, do.v,
    p^T.do, ds.k and ds^T.q: 7 products of T x T x D, half of each under the causal mask."""
    return 7 * 2 * b * HQ * (t * t / 2) * HD


def make_problem(op, dtype, tokens, gen):
    b, t = 4, tokens // 4

    def r(h):
        return torch.randn(b, t, h, HD, generator=gen).to(dtype).transpose(1, 2)
    inputs, grads = [r(HQ), r(HK), r(HK)], [r(HQ)]
    nbytes = sum(x.numel() for x in inputs + grads) * 2 * inputs[0].element_size()  # in + grads out
    fns = {"fastft": lambda q, k, v: _cpu_attention(q, k, v, bf16_dot=True), "eager": sdpa,
           "ref": attention_reference}
    if dtype == torch.bfloat16 and _backend.cpu_ext().attention_has_bf16_dot():
        # the kernel's other bf16 path (fp32 FMA tiles, what CPUs without AVX512-BF16 run)
        fns["fastft-fma"] = lambda q, k, v: _cpu_attention(q, k, v, bf16_dot=False)
    return inputs, [], grads, nbytes, fns


def _cpu_attention(q, k, v, bf16_dot: bool):
    # The switch is read when the kernel runs; each variant's forward and backward run before the
    # next variant's forward (run_op), so the backward sees the same setting as its forward.
    _backend.cpu_ext().attention_bf16_dot(bf16_dot)
    return causal_attention(q, k, v, forced="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cpu" not in _backend.available_backends("attention", "cpu"):
        raise SystemExit("fastft._C without the attention kernel: build it first (see README)")
    rows, notes = [], []
    print(machine(), flush=True)
    flops = causal_flops(4, args.tokens // 4)
    for dtype in (torch.bfloat16, torch.float32):
        # bf16 tolerance 2^-6 of max |ref|: SDPA's own bf16 dk error is 0.96% (fastft's 0.24-0.38%)
        run_op("attention", dtype, args, rows, notes, not args.no_compile, problem=make_problem, tol16=2 ** -6)
        _backend.cpu_ext().attention_bf16_dot(True)
    for r in rows:
        r["GFLOP/s"] = round(flops / (r["median_ms"] / 1e3) / 1e9, 1)
    write_csv(rows, "attention.csv")
    md = io.StringIO()
    cmd = "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:])
    md.write(f"# Causal attention, forward + backward (one SmolLM2-135M layer, {args.tokens} tokens)\n\n")
    md.write(f"Command: `{cmd.strip()}`\n\nMachine: {machine()}\n\n")
    md.write("Speedups are SDPA (eager) time / variant time: of the medians, the median of per-round "
             "paired ratios, and of the minima. GFLOP/s: the causal fwd+bwd's useful FLOPs "
             f"({flops / 1e9:.2f} GFLOP) / median time.\n\n")
    md.write("| dtype | variant | median ms | min ms | speedup (medians) | speedup (paired) | "
             "speedup (minima) | GFLOP/s |\n|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        md.write(f"| {r['dtype']} | {r['variant']} | {r['median_ms']} | {r['min_ms']} | {r['speedup_vs_eager']} | "
                 f"{r['paired_speedup']} | {r['min_speedup']} | {r['GFLOP/s']} |\n")
    md.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    with open(os.path.join(RESULTS, "attention.md"), "w") as f:
        f.write(md.getvalue())
    print(md.getvalue())


if __name__ == "__main__":
    main()
