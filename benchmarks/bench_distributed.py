"""Data-parallel scaling on one machine: tokens/s of 1 process vs 2 ranks, and the share of a
2-rank step spent communicating.

    python benchmarks/bench_distributed.py [--model default|tiny|PATH] [--mode lora|full]
        [--batch 8] [--seq 256] [--steps 6] [--warmup 2] [--dtype auto|bf16|fp32]
        [--ranks 2] [--device cpu|cuda] [--strategy auto|ddp|fsdp]

Same global batch (``--batch`` sequences of ``--seq`` tokens per optimizer step, fixed-length
rows of random token ids) in three settings, each in fresh processes:

* ``1p x 1t``: one process, 1 thread;
* ``1p x 2t``: one process, 2 threads (CPU only: the fair baseline for 2 ranks on 2 cores);
* ``2r x 1t``: torch.distributed (gloo on CPU, NCCL with ``--device cuda``, one GPU per rank),
  ``--ranks`` ranks x 1 thread, batch/ranks per rank, through fastft's own Trainer
  (``--strategy`` = ``train.distributed``; ``auto``: DDP for LoRA, FSDP2 for full; ``fsdp``
  with LoRA shards the frozen base too).

Correctness first: the 2-rank run's per-step losses must equal the 1-process losses (same global
batches; rel 1e-5 in fp32, 2e-2 in bf16) or no timing is printed. Communication share: inside
the 2-rank job, the collectives of one step are replayed alone with the same sizes (DDP: one
all-reduce of the trainable gradients; FSDP2: all-gather of every parameter in forward and again
in backward, in the gathered dtype, and reduce-scatter of the trainable gradients in fp32) and
their median time divided by the median step time. Results: benchmarks/results/distributed.{csv,md} (with machine and versions).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def worker(spec: dict) -> None:
    """One rank (or the single process): train warmup+steps steps, report times and losses."""
    import torch

    torch.set_num_threads(spec["threads"])
    from fastft.train import distributed as dist
    from fastft.config import load_config
    from fastft.data import DataBundle
    from fastft.train.cli import build
    from fastft.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(10, 900, (spec["seq"],), generator=g).tolist()), "labels": list(ids)}
            for _ in range(spec["batch"] * 64)]
    world = dist.launched_world_size()
    total = spec["warmup"] + spec["steps"]
    cfg = load_config(None, [
        "--model.path", spec["model"], "--model.dtype", spec["dtype"], "--finetune.mode", spec["mode"],
        "--train.batch_size", str(spec["batch"] // world), "--train.max_steps", str(total),
        "--train.scheduler", "constant", "--train.progress", "false", "--output.tensorboard", "false",
        "--data.val_ratio", "0", "--lora.dropout", "0", "--model.dropout", "0", "--train.device", spec["device"],
        "--train.distributed", spec["strategy"], "--output.dir", spec["run_dir"]])
    model, tok, bundle, device = build(cfg, bundle=DataBundle(train=rows))
    tr = Trainer(cfg, Path(spec["run_dir"]), model, tok, bundle, device, log=lambda s: None)
    times, losses = [], []
    for _ in range(total):
        dist.barrier()
        t0 = time.perf_counter()
        rec = tr.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(rec["loss"])
    out = {"times": times[spec["warmup"]:], "losses": losses, "strategy": tr.strategy,
           "tokens_per_step": spec["batch"] * spec["seq"]}
    if world > 1:
        out["comm"] = comm_time(tr, reps=5)
    if dist.is_main():
        Path(spec["out"]).write_text(json.dumps(out))
    dist.cleanup()


def comm_time(tr, reps: int) -> float:
    """Median seconds of one step's collectives replayed alone (same sizes and dtypes)."""
    import torch
    import torch.distributed as tdist

    from fastft.train import distributed as dist

    trainable = [p for p in tr.model.parameters() if p.requires_grad]
    ws = dist.world_size()
    if tr.strategy == "ddp":
        by_dtype: dict = {}
        for p in trainable:
            by_dtype[p.dtype] = by_dtype.get(p.dtype, 0) + p.numel()
        bufs = [torch.zeros(n, dtype=dt, device=tr.device) for dt, n in by_dtype.items()]

        def once():
            for b in bufs:
                tdist.all_reduce(b)
    else:
        # a 16-bit run keeps fp32 shards and gathers them in the run dtype (MixedPrecisionPolicy,
        # fastft.distributed.wrap); gradients are reduced in fp32
        low = set(getattr(tr.model, "_fastft_export_dtypes", {}).values()) & {torch.bfloat16, torch.float16}
        gather: dict = {}
        for p in tr.model.parameters():
            local = dist.to_local(p)
            dt = next(iter(low)) if low else local.dtype
            gather[dt] = gather.get(dt, 0) + local.numel()
        reduce_n = sum(dist.to_local(p).numel() for p in trainable)  # LoRA: the adapters only
        g_bufs = [(torch.zeros(n, dtype=dt, device=tr.device), torch.zeros(n * ws, dtype=dt, device=tr.device))
                  for dt, n in gather.items()]
        r_shard, r_full = (torch.zeros(n, device=tr.device) for n in (reduce_n, reduce_n * ws))
        # torch 2.13 renamed the collectives (the old names warn); older torch has only the old ones
        all_gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
        reduce_scatter = getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor

        def once():
            for s, f in g_bufs:
                all_gather(f, s)  # forward
                all_gather(f, s)  # backward (resharded after forward)
            reduce_scatter(r_shard, r_full)  # gradients
    ts = []
    for _ in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        once()
        if tr.device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, world: int, threads: int) -> dict:
    spec = {**spec, "threads": threads}
    with tempfile.TemporaryDirectory() as d:
        spec["out"], spec["run_dir"] = str(Path(d) / "out.json"), str(Path(d) / "run")
        port = free_port()
        procs = []
        for r in range(world):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
            if world > 1:
                env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"bench_distributed: a worker failed (exit codes {codes})")
        return json.loads(Path(spec["out"]).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default (SmolLM2-135M), tiny (random 2-layer Llama) or a path")
    ap.add_argument("--mode", default="lora", choices=("lora", "full"))
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step), even")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the distributed run (GPUs with --device cuda)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--strategy", default="auto", choices=("auto", "ddp", "fsdp"),
                    help="train.distributed of the multi-rank run (auto: ddp for lora, fsdp for full)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    if a.ranks < 2 or a.batch % a.ranks:
        raise SystemExit(f"--batch {a.batch} --ranks {a.ranks}: expected 2+ ranks that divide the global batch")
    model = a.model
    if model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from trainer_helpers import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="fastft-bench-tiny-")) / "model"))
    spec = {"model": model, "mode": a.mode, "batch": a.batch, "seq": a.seq, "steps": a.steps,
            "warmup": a.warmup, "dtype": a.dtype, "device": a.device, "strategy": a.strategy}
    multi = f"{a.ranks}r x 1t"
    runs = {"1p x 1t": launch(spec, 1, 1)}
    if a.device == "cpu":
        runs[f"1p x {a.ranks}t"] = launch(spec, 1, a.ranks)
    runs[multi] = launch(spec, a.ranks, 1)
    two, one = runs[multi]["losses"], runs["1p x 1t"]["losses"]
    rel = 1e-5 if a.dtype == "fp32" else 2e-2
    bad = [(i, x, y) for i, (x, y) in enumerate(zip(two, one)) if abs(x - y) > rel * abs(y)]
    if bad:
        raise SystemExit(f"bench_distributed: 2-rank losses differ from 1 process (step, 2r, 1p): {bad[:3]}; "
                         "no timing reported")
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows = []
    for name, r in runs.items():
        med = statistics.median(r["times"])
        rows.append({"setting": name, "strategy": r["strategy"], "median_step_s": round(med, 4),
                     "tokens_per_s": round(r["tokens_per_step"] / med, 1),
                     "comm_share": round(r["comm"] / med, 3) if "comm" in r else "",
                     "model": a.model, "mode": a.mode, "batch": a.batch, "seq": a.seq, "machine": machine})
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "distributed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# bench_distributed ({machine}; {time.strftime('%Y-%m-%d %H:%M')})", "",
             f"{a.mode} ({a.strategy}), model {a.model}, global batch {a.batch} x {a.seq}; losses of 2 ranks = 1 process "
             f"(rel {rel:g})", "", "| setting | strategy | median step (s) | tokens/s | comm share |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['strategy']} | {r['median_step_s']} | {r['tokens_per_s']} | {r['comm_share']} |"
              for r in rows]
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
