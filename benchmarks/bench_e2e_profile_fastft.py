"""Profile fastft's own training step (``fastft.train.trainer.Trainer.train_step``, built exactly as
``fastft train`` builds it) on the rows ``fastft bench`` uses, and print the top ops.

Usage: ``python benchmarks/bench_e2e_profile_fastft.py [--mode lora|full] [--workload instruction|text] [--batch 4] [--seq 256]
[--top 30] [--shapes] [-- --section.key value ...]``
Writes ``benchmarks/results/e2e_profile_fastft_<mode>.txt`` (temp file + os.replace) and stdout.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--shapes", action="store_true", help="group the table by input shapes")
    ap.add_argument("--workload", choices=["instruction", "text"], default="instruction")
    ap.add_argument("overrides", nargs="*", help="extra fastft config overrides (--section.key value)")
    args = ap.parse_args()
    from fastft.bench.cli import machine_info
    from fastft.bench.data import build_rows
    from fastft.bench.runners import load_rows
    from fastft.config import load_config
    from fastft.data import DataBundle
    from fastft.models.loading import load_tokenizer, materialize
    from fastft.train.cli import build
    from fastft.train.trainer import Trainer

    steps = 4
    tmp = Path(tempfile.mkdtemp(prefix="fastft-prof-"))
    # the rows fastft bench trains on (fastft/bench/data.py), from the default model's tokenizer
    build_rows(args.workload, load_tokenizer(materialize()), args.seq, steps * args.batch, 0, tmp / "rows.pt")
    ov = ["--finetune.mode", args.mode, "--lora.dropout", "0", "--train.batch_size", str(args.batch),
          "--train.max_steps", str(steps), "--train.scheduler", "constant", "--train.progress", "false",
          "--output.tensorboard", "false", "--output.dir", str(tmp / "run"), "--data.val_ratio", "0",
          *args.overrides]
    cfg = load_config(None, ov)
    model, tok, bundle, device = build(cfg, bundle=DataBundle(train=load_rows(str(tmp / "rows.pt"), False)))
    (tmp / "run").mkdir()
    tr = Trainer(cfg, tmp / "run", model, tok, bundle, device, log=lambda s: None)
    tr.train_step()  # warm-up: oneDNN primitive creation
    t0 = time.perf_counter()
    tr.train_step()
    dt = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        tr.train_step()
    table = prof.key_averages(group_by_input_shape=args.shapes).table(
        sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48, max_shapes_column_width=70)
    info = machine_info("cpu")
    head = (f"machine: {info['processor']} {info['cores']} cores, load average {info['load_avg'][0]:.2f}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}\n"
            f"fastft backends: {info['ops']}\nconfig overrides: {' '.join(ov)}\n"
            f"unprofiled fastft step ({args.mode}): {dt:.3f} s = {args.batch * args.seq / dt:.0f} tok/s "
            f"(batch {args.batch}x{args.seq})\n")
    out = Path(__file__).parent / "results" / f"e2e_profile_fastft_{args.mode}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".tmp")
    part.write_text(head + table + "\n")
    os.replace(part, out)
    print(head + table)


if __name__ == "__main__":
    main()
