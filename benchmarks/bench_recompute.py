"""Selective recompute of RMSNorm/SwiGLU outputs (``model.recompute_cheap``, fastft/models/recompute.py):
saved-activation bytes, RSS and step time of a full fine-tuning step, switch on vs off.

    python benchmarks/bench_recompute.py [--batch 4] [--seq 256] [--rounds 6] [--rss-rounds 2]

The model is SmolLM2-135M (packaged GGUF) built by ``fastft.train.cli.build`` in full mode with
bf16 weights (fp32 norms/embeddings, as ``fastft train`` does), fused blocks on. In one process:

1. correctness first: loss and every gradient of one forward+backward are bitwise equal on/off;
2. saved bytes: the storages the autograd graph keeps after one forward (parameters excluded),
   observed at the pack hook, on vs off, and the drop expected from the shapes
   ``layers x B x T x (2 hidden + intermediate) x 2 bytes``; deterministic;
3. time: forward+backward alternating on/off (order flipped every round), medians and the median
   of the per-round paired ratios (the machine is shared); also the time spent inside the
   recomputations themselves (summed over one backward).

Then ``--rss-rounds`` fresh processes per setting (alternating) each run one forward+backward on a
clean heap and report the RSS growth during forward and the peak during backward (sampled every
3 ms): glibc keeps freed memory, so only a fresh process shows an activation saving in RSS.
Results: benchmarks/results/recompute.{csv,md}.
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
import threading
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_full(batch: int, seq: int):
    """SmolLM2 as ``fastft train --finetune.mode full --model.dtype bf16`` builds it, and a batch."""
    from fastft.config import load_config
    from fastft.data import DataBundle
    from fastft.train.cli import build

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 49152, (seq,), generator=g).tolist()} for _ in range(batch)]
    for r in rows:
        r["labels"] = list(r["input_ids"])
    cfg = load_config(None, ["--finetune.mode", "full", "--model.dtype", "bf16", "--train.progress", "false",
                             "--data.max_length", str(seq), "--data.val_ratio", "0"])
    model, _, _, _ = build(cfg, bundle=DataBundle(train=rows))
    model.train()
    ids = torch.tensor([r["input_ids"] for r in rows])
    return model, ids


def fwd_bwd(model, ids, on: bool, zero: bool = True):
    from fastft.train.utils import CausalLMLoss

    t0 = time.perf_counter()
    loss, n = CausalLMLoss(model, fused_ce=True, recompute_cheap=on)(ids, torch.ones_like(ids), ids)
    t1 = time.perf_counter()
    (loss / n).backward()
    t2 = time.perf_counter()
    grads = None if zero else {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return loss.detach(), grads, t1 - t0, t2 - t1


def saved_bytes(model, ids, on: bool) -> int:
    """Bytes of the non-parameter storages the graph keeps after one forward."""
    from fastft.models import recompute
    from fastft.train.utils import unwrap

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}
    rc = recompute.recompute_cheap(on)
    inner = rc._pack

    def pack(t):  # ours (or the identity when off), observed
        r = inner(t)
        if isinstance(r, torch.Tensor) and r.untyped_storage().data_ptr() not in params:
            kept[r.untyped_storage().data_ptr()] = r.untyped_storage().nbytes()
        return r
    lm = unwrap(model)
    if on:
        rc._pack_fn = pack
        with rc:
            out = lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
    del out
    return sum(kept.values())


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_child(args) -> None:
    """One fresh process, one setting: RSS before, max during forward, max during backward."""
    model, ids = build_full(args.batch, args.seq)
    samples, stop = [], [False]

    def sampler():
        while not stop[0]:
            samples.append((time.perf_counter(), rss_mb()))
            time.sleep(0.003)
    threading.Thread(target=sampler, daemon=True).start()
    from fastft.train.utils import CausalLMLoss

    on = args.rss_child == "on"
    time.sleep(0.05)
    t0, r0 = time.perf_counter(), rss_mb()
    loss, n = CausalLMLoss(model, fused_ce=True, recompute_cheap=on)(ids, torch.ones_like(ids), ids)
    t1 = time.perf_counter()
    (loss / n).backward()
    t2 = time.perf_counter()
    time.sleep(0.01)
    stop[0] = True
    fwd = max(r for t, r in samples if t0 <= t <= t1)
    bwd = max(r for t, r in samples if t1 <= t <= t2)
    print(json.dumps({"on": on, "rss_before": r0, "fwd_max": fwd, "bwd_max": bwd}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rss-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default). On a loaded "
                    "machine every OpenMP region of 2 threads can wait a scheduler slice (~12 ms measured), "
                    "which 1 thread avoids")
    ap.add_argument("--rss-child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)

    from fastft.models import recompute
    from fastft.train.utils import unwrap

    model, ids = build_full(args.batch, args.seq)
    cfg = unwrap(model).config
    L, H, inter = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    # 1. correctness
    l_off, g_off, _, _ = fwd_bwd(model, ids, False, zero=False)
    l_on, g_on, _, _ = fwd_bwd(model, ids, True, zero=False)
    assert torch.equal(l_on, l_off), (l_on, l_off)
    bad = [k for k in g_off if not torch.equal(g_off[k], g_on[k])]
    assert not bad and g_on.keys() == g_off.keys(), f"gradients differ: {bad[:5]}"
    print(f"correctness: loss {l_on.item():.6f} and all {len(g_on)} parameter gradients bitwise equal on/off")
    del g_on, g_off
    # 2. saved bytes
    s_off, s_on = saved_bytes(model, ids, False), saved_bytes(model, ids, True)
    expect = L * args.batch * args.seq * (2 * H + inter) * 2
    print(f"saved activations: off {s_off / 2**20:.1f} MB, on {s_on / 2**20:.1f} MB, drop "
          f"{(s_off - s_on) / 2**20:.1f} MB (expected from shapes {expect / 2**20:.1f} MB)")
    # 3. time, alternating
    spent = [0.0]
    orig = recompute._Recipe._run

    def timed(self):
        t = time.perf_counter()
        y = orig(self)
        spent[0] += time.perf_counter() - t
        return y
    recompute._Recipe._run = timed
    fwd_bwd(model, ids, True)
    fwd_bwd(model, ids, False)  # warm both
    t = {True: [], False: []}
    tb = {True: [], False: []}
    rec = []
    ratios = []
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            spent[0] = 0.0
            _, _, tf, tbk = fwd_bwd(model, ids, on)
            t[on].append(tf + tbk)
            tb[on].append(tbk)
            if on:
                rec.append(spent[0])
        ratios.append(t[True][-1] / t[False][-1])
        print(f"round {r}: on {t[True][-1]:.3f} s (recompute {rec[-1] * 1e3:.1f} ms), off {t[False][-1]:.3f} s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    recompute._Recipe._run = orig
    med = {k: statistics.median(v) for k, v in t.items()}
    ratio = statistics.median(ratios)
    rec_ms = statistics.median(rec) * 1e3
    print(f"fwd+bwd median: on {med[True]:.3f} s, off {med[False]:.3f} s, paired ratio on/off {ratio:.3f}; "
          f"time inside recomputations {rec_ms:.1f} ms/step = {rec_ms / 1e3 / med[True] * 100:.2f}% of the step")
    # 4. RSS in fresh processes, alternating
    rss = {"on": [], "off": []}
    for r in range(args.rss_rounds):
        for which in (("on", "off") if r % 2 == 0 else ("off", "on")):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", which, "--batch",
                                  str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            rss[which].append(d)
            print(f"rss {which}: before {d['rss_before']:.0f} MB, forward max {d['fwd_max']:.0f} "
                  f"(+{d['fwd_max'] - d['rss_before']:.0f}), backward max {d['bwd_max']:.0f} "
                  f"(+{d['bwd_max'] - d['rss_before']:.0f})", flush=True)
    def step_growth(v):  # MB above the RSS before the step: its max over forward and backward
        return statistics.median(max(d["fwd_max"], d["bwd_max"]) - d["rss_before"] for d in v) if v else float("nan")
    growth = {k: step_growth(v) for k, v in rss.items()}
    print(f"RSS growth of a step on a fresh heap, median: on +{growth['on']:.0f} MB, off +{growth['off']:.0f} MB")

    os.makedirs(RESULTS, exist_ok=True)
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
           f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    row = {"date": time.strftime("%Y-%m-%d %H:%M"), "batch": args.batch, "seq": args.seq,
           "saved_off_mb": round(s_off / 2**20, 1), "saved_on_mb": round(s_on / 2**20, 1),
           "expected_drop_mb": round(expect / 2**20, 1), "fwdbwd_on_s": round(med[True], 3),
           "fwdbwd_off_s": round(med[False], 3), "ratio_on_off": round(ratio, 3), "recompute_ms": round(rec_ms, 1),
           "rss_step_growth_on_mb": f"{growth['on']:.0f}", "rss_step_growth_off_mb": f"{growth['off']:.0f}", "env": env}
    path = os.path.join(RESULTS, "recompute.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    with open(os.path.join(RESULTS, "recompute.md"), "a") as f:
        f.write(f"\n## {row['date']} ({env})\n\n`python benchmarks/bench_recompute.py --batch {args.batch} --seq {args.seq} "
                f"--rounds {args.rounds} --rss-rounds {args.rss_rounds} --threads {args.threads}`; SmolLM2-135M full mode bf16, fused blocks.\n\n"
                f"| | off | on | on/off |\n|---|---|---|---|\n"
                f"| saved activations after forward (MB) | {row['saved_off_mb']} | {row['saved_on_mb']} | "
                f"{s_on / s_off:.3f} (drop {(s_off - s_on) / 2**20:.1f}, expected {row['expected_drop_mb']}) |\n"
                f"| fwd+bwd median (s), paired ratio | {row['fwdbwd_off_s']} | {row['fwdbwd_on_s']} | {row['ratio_on_off']} |\n"
                f"| time inside recomputations (ms/step) | - | {row['recompute_ms']} | "
                f"{rec_ms / 1e3 / med[True] * 100:.2f}% of the step |\n"
                f"| RSS growth of one step, fresh process (MB, median of {args.rss_rounds}) | "
                f"{row['rss_step_growth_off_mb']} | {row['rss_step_growth_on_mb']} | "
                f"{growth['on'] - growth['off']:+.0f} MB |\n")


if __name__ == "__main__":
    main()
