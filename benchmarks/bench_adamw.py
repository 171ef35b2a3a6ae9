"""Benchmark: fastft FusedAdamW(max_grad_norm=...) vs torch clip_grad_norm_ + AdamW(fused=True).

    python benchmarks/bench_adamw.py [--params 50e6] [--reps 15]

Three cases on a ~50M-parameter Llama-shaped set of tensors (embedding, attention, MLP, norms):

* ``fp32``: fp32 params and grads. torch: ``clip_grad_norm_`` + ``AdamW(fused=True)``.
* ``bf16-master``: bf16 params/grads, fp32 master + moments. torch's equivalent keeps fp32
  master params: upcast the bf16 grads into them, clip, fused AdamW, round back into the bf16
  params (``torch-bf16-nomaster``, fused AdamW straight on bf16 params with bf16 moments, is
  reported too, but it is not the same maths).
* ``bf16-split-master``: as ``bf16-master`` with FusedAdamW's default split masters (the bf16
  param is the master's high half, an int16 tensor the low half: 2 bytes/param less). The
  fp32-master FusedAdamW runs in the same alternating loop (``fastft fp32-master clip+step``),
  so the split/fp32 ratio comes from one run.

``torch.compile clip+step`` (unless ``--no-compile``) is the same torch path compiled (foreach
AdamW: compile does not trace ``fused=True``), checked against the eager torch path too.

Correctness is checked first (3 steps against the torch path on the same grads), then each
variant is timed alternately (medians of ``--reps``). Effective bandwidth = bytes the algorithm
must move per parameter x params / time, next to an in-place streaming bandwidth measured in the
same run (``a.addcmul_(b, c)`` over 512 MiB tensors). Writes benchmarks/results/adamw.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastft import _backend  # noqa: E402
from fastft.optim import FusedAdamW  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAX_NORM = 1.0


def llama_shapes(target: float) -> list[tuple[int, ...]]:
    """Llama-like tensor shapes (hidden 640, MLP 1728, vocab 16384) with ~target params."""
    h, inter, vocab = 640, 1728, 16384
    shapes: list[tuple[int, ...]] = [(vocab, h)]
    layer = [(h, h)] * 4 + [(inter, h), (inter, h), (h, inter), (h,), (h,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    for _ in range(max(1, round((target - vocab * h - h) / per_layer))):
        shapes += layer
    return shapes + [(h,)]


def timeit(fn, sync=lambda: None) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def streaming_gbs(reps: int) -> float:
    n = 512 * 2 ** 20 // 4  # 512 MiB per tensor
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    b.mul_(1e-6)
    times = [timeit(lambda: a.addcmul_(b, c)) for _ in range(reps)]
    del a, b, c
    return 4 * n * 4 / statistics.median(times) / 1e9  # read a, b, c; write a


class TorchMasterAdamW:
    """torch's way to train bf16 params with fp32 masters: copy grads up, clip, step, copy down."""

    def __init__(self, params: list[torch.nn.Parameter], fused: bool = True):
        self.params = params
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in params]
        # torch.compile takes the foreach implementation (it does not trace fused=True)
        self.opt = torch.optim.AdamW(self.masters, lr=1e-3, weight_decay=0.01, fused=fused, foreach=not fused)

    def step(self) -> torch.Tensor:
        for m, p in zip(self.masters, self.params):
            if m.grad is None:
                m.grad = torch.empty_like(m)
        torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.params])
        norm = torch.nn.utils.clip_grad_norm_(self.masters, MAX_NORM)
        self.opt.step()
        torch._foreach_copy_([p.data for p in self.params], self.masters)
        return norm


def torch_path(dtype: torch.dtype, init: list[torch.Tensor], fused: bool):
    """torch's clip + AdamW step on fresh params: (params, step function, master helper or None)."""
    if dtype == torch.float32:
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused, foreach=not fused)

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
        return params, step, None
    params = [torch.nn.Parameter(x.to(dtype)) for x in init]
    m = TorchMasterAdamW(params, fused=fused)
    return params, m.step, m


def run_case(name: str, dtype: torch.dtype, shapes, reps: int, rows: list, notes: list,
             master_format: str = "fp32", compile_ok: bool = True) -> None:
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) * 1e-3 for s in shapes]  # norm ~7 > MAX_NORM
    n = sum(x.numel() for x in init)
    ours_p = [torch.nn.Parameter(x.to(dtype)) for x in init]
    ours = FusedAdamW(ours_p, lr=1e-3, weight_decay=0.01, max_grad_norm=MAX_NORM,
                      master_weights=dtype != torch.float32, master_format=master_format)
    ours_noclip = None
    ref_p, ref_step, ref_m = torch_path(dtype, init, fused=True)
    for p, q, g in zip(ours_p, ref_p, grads):
        p.grad, q.grad = g, g.clone()
    compiled = None
    if compile_ok:  # torch.compile of the same torch path (foreach AdamW), on its own copies
        t0 = time.perf_counter()
        c_p, c_step, c_m = torch_path(dtype, init, fused=False)
        for q, g in zip(c_p, grads):
            q.grad = g.clone()
        try:
            c_step = torch.compile(c_step)
            for _ in range(3):
                for q, g in zip(c_p, grads):
                    q.grad.copy_(g)
                c_step()
            compiled = (c_p, c_step, c_m)
            notes.append(f"{name}: torch.compile of the torch path (foreach AdamW): first 3 steps took "
                         f"{time.perf_counter() - t0:.1f} s (compilation)")
        except Exception as e:  # noqa: BLE001 - report and go on without it
            notes.append(f"{name}: torch.compile failed ({type(e).__name__}: {str(e)[:120]})")

    # -- correctness first: 3 identical steps (grads restored each time: torch clips in place)
    for _ in range(3):
        for q, g in zip(ref_p, grads):
            q.grad.copy_(g)
        ours.step()
        ref_step()
    if dtype == torch.float32:
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours_p, ref_p))
        tol = 1e-5  # fused=True on CPU uses its own op order, a few ulps from the for-loop AdamW
    else:
        err = max(((ours.master_weight(a) - b).abs().max() / b.abs().max()).item()
                  for a, b in zip(ours_p, ref_m.masters))
        tol = 1e-5
    ok = err <= tol
    notes.append(f"{name}: correctness vs torch after 3 steps: max rel err {err:.2e} "
                 f"({'OK' if ok else 'FAIL'}, tol {tol:g}); grad norm {float(ours.last_grad_norm):.4f}")
    if not ok:
        raise SystemExit(f"{name}: fastft disagrees with torch ({err:.3g} > {tol:g}); not timing")
    if compiled is not None:
        c_p, _, c_m = compiled
        got, want = (c_p, ref_p) if dtype == torch.float32 else (c_m.masters, ref_m.masters)
        cerr = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
        notes.append(f"{name}: torch.compile vs torch after 3 steps: max rel err {cerr:.2e}")
        if cerr > tol:
            raise SystemExit(f"{name}: torch.compile disagrees with torch ({cerr:.3g}); not timing")

    # -- timing, alternating
    ext = _backend.cpu_ext()
    gptr = [g.data_ptr() for g in grads]
    gnum = [g.numel() for g in grads]
    gdt = [_backend.DTYPE_CODES[dtype]] * len(grads)
    ours_noclip = FusedAdamW(ours_p, lr=1e-3, weight_decay=0.01, master_weights=dtype != torch.float32,
                             master_format=master_format)
    ours_noclip.load_state_dict(ours.state_dict())
    variants = {
        "fastft clip+step": ours.step,
        "torch clip+step": ref_step,
        "fastft step only": ours_noclip.step,
        "fastft norm only": lambda: ext.adamw_grad_sumsq(gptr, gnum, gdt),
    }
    if master_format == "split":  # the fp32-master path on its own copies, same loop
        f32_p = [torch.nn.Parameter(x.to(dtype)) for x in init]
        for p, g in zip(f32_p, grads):
            p.grad = g
        f32 = FusedAdamW(f32_p, lr=1e-3, weight_decay=0.01, max_grad_norm=MAX_NORM, master_weights=True,
                         master_format="fp32")
        variants["fastft fp32-master clip+step"] = f32.step
    if compiled is not None:
        variants["torch.compile clip+step"] = compiled[1]
    if dtype != torch.float32:
        nm_p = [torch.nn.Parameter(x.to(dtype)) for x in init]
        for p, g in zip(nm_p, grads):
            p.grad = g.clone()
        nm = torch.optim.AdamW(nm_p, lr=1e-3, weight_decay=0.01, fused=True)

        def nomaster():
            torch.nn.utils.clip_grad_norm_(nm_p, MAX_NORM)
            nm.step()
        variants["torch-bf16-nomaster clip+step"] = nomaster
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(reps):
        for k, fn in variants.items():
            times[k].append(timeit(fn))
    gsz = torch.tensor([], dtype=dtype).element_size()
    psz = gsz
    # bytes the algorithm must move per parameter
    # g, m rw, v rw, then: fp32 master rw + p w | split: p rw + low half rw | fp32 p rw
    upd = gsz + 8 + 8 + (8 + psz if master_format == "fp32" else 4 + 4) if dtype != torch.float32 else 4 + 8 + 8 + 8
    upd_f32 = gsz + 8 + 8 + 8 + psz
    # torch fp32: norm read 4 + in-place scale 8 + fused AdamW 28 = 40; torch master path adds
    # the grad upcast (2 read + 4 write) and the param downcast (4 read + 2 write) to that: 52;
    # torch on bf16 params without master: norm 2 + scale 4 + AdamW (g 2 + p, m, v rw 12) = 20
    bytes_pp = {"fastft clip+step": upd + gsz, "fastft step only": upd, "fastft norm only": gsz,
                "torch clip+step": 40 if dtype == torch.float32 else 52,
                "torch.compile clip+step": 40 if dtype == torch.float32 else 52,
                "fastft fp32-master clip+step": upd_f32 + gsz,
                "torch-bf16-nomaster clip+step": 20}
    base = statistics.median(times["torch clip+step"])
    base_min = min(times["torch clip+step"])
    for k, ts in times.items():
        med = statistics.median(ts)
        bpp = bytes_pp.get(k)
        rows.append({"case": name, "variant": k, "params": n, "median_ms": round(med * 1e3, 3),
                     "min_ms": round(min(ts) * 1e3, 3),
                     "ratio_vs_torch": round(med / base, 3),
                     "min_ratio_vs_torch": round(min(ts) / base_min, 3),
                     "bytes_per_param": bpp or "",
                     "effective_GBps": round(bpp * n / med / 1e9, 1) if bpp else ""})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cases", default="fp32,bf16-master,bf16-split-master")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = llama_shapes(args.params)
    info = _backend.describe()
    rows: list[dict] = []
    notes: list[str] = []
    stream_before = streaming_gbs(args.reps)
    for case in args.cases.split(","):
        run_case(case, torch.float32 if case == "fp32" else torch.bfloat16, shapes, args.reps, rows, notes,
                 "split" if case == "bf16-split-master" else "fp32", not args.no_compile)
    stream_after = streaming_gbs(args.reps)
    stream = max(stream_before, stream_after)
    for r in rows:
        r["pct_of_streaming"] = round(100 * r["effective_GBps"] / stream, 1) if r["effective_GBps"] else ""
    for case in {r["case"] for r in rows}:
        ours = next(r for r in rows if r["case"] == case and r["variant"] == "fastft clip+step")
        torch_ms = next(r["median_ms"] for r in rows if r["case"] == case and r["variant"] == "torch clip+step")
        upd_gbs = next(r["effective_GBps"] for r in rows if r["case"] == case and r["variant"] == "fastft step only")
        nbytes = ours["bytes_per_param"] * ours["params"]
        notes.append(f"{case}: exact clip+step must move {ours['bytes_per_param']} B/param (grads read twice): "
                     f"{nbytes / (stream * 1e9) * 1e3:.1f} ms at the addcmul streaming bandwidth, "
                     f"{nbytes / (upd_gbs * 1e9) * 1e3:.1f} ms at the update pass's own {upd_gbs} GB/s, "
                     f"i.e. a ratio of at least {nbytes / (upd_gbs * 1e9) * 1e3 / torch_ms:.3f} "
                     f"against this run's torch median")
    split = {r["variant"]: r for r in rows if r["case"] == "bf16-split-master"}
    if split:
        a, b = split["fastft clip+step"], split["fastft fp32-master clip+step"]
        notes.append(f"bf16-split-master: split / fp32-master clip+step time, same alternating loop: "
                     f"{a['median_ms'] / b['median_ms']:.3f} (median), {a['min_ms'] / b['min_ms']:.3f} (min); "
                     f"optimizer state 18 vs 20 B/param (m, v, low half vs m, v, master)")
    os.makedirs(RESULTS, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    _atomic_write(os.path.join(RESULTS, "adamw.csv"), buf.getvalue())
    load = os.getloadavg()
    md = [f"# AdamW + gradient clipping ({rows[0]['params'] / 1e6:.1f}M params)", "",
          f"Command: `python benchmarks/bench_adamw.py --params {args.params:g} --reps {args.reps}`", "",
          f"Machine: {info['processor']}, {os.cpu_count()} CPUs, omp threads "
          f"{info['cpu_features'].get('omp_max_threads') if isinstance(info['cpu_features'], dict) else '?'}; "
          f"python {info['python']}, torch {info['torch']}, triton {info['triton']}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared machine: compare ratios)", "",
          f"In-place streaming bandwidth (`a.addcmul_(b, c)`, 512 MiB tensors): "
          f"{stream_before:.1f} GB/s before, {stream_after:.1f} GB/s after; best {stream:.1f} GB/s", "",
          "| case | variant | median ms | min ms | ratio vs torch (median) | ratio (min) | B/param | GB/s (median) | % streaming |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['variant']} | {r['median_ms']} | {r['min_ms']} | {r['ratio_vs_torch']} | "
                  f"{r['min_ratio_vs_torch']} | "
                  f"{r['bytes_per_param']} | {r['effective_GBps']} | {r['pct_of_streaming']} |")
    md += [""] + [f"- {n}" for n in notes]
    _atomic_write(os.path.join(RESULTS, "adamw.md"), "\n".join(md) + "\n")
    print("\n".join(md))


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
