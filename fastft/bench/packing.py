"""Benchmark: packed vs unpacked training on fastft's fast path, in target tokens per second
(``fastft bench --packing`` and ``benchmarks/bench_packing.py``).

    python benchmarks/bench_packing.py step  [--rows 4] [--seq 256] [--rounds 10] [--hf] [-- fastft overrides]
    python benchmarks/bench_packing.py epoch [--rounds 1] [--batch 8] [--packed-batch 8] [-- fastft overrides]
    fastft bench --packing [--model M] [--mode lora] [--seq 256] [--rounds N]   (step --hf, then epoch)

Target tokens (positions with a label) are the fair unit when padding differs: every variant below
trains on the same samples, so the same target tokens.

``step`` (one process): the model ``fastft train`` would build (default: SmolLM2-135M, bf16, LoRA
r=16 on q,v, fused layers; overrides after ``--`` as for ``fastft train``), and the first bundled
instruction samples that fill ``rows`` packed rows of ``seq`` tokens (~40-token samples). Three
batches, one forward+backward each per round, alternating, medians:

* ``packed``: the packed rows with their per-sample positions (segment-aware attention, no mask);
* ``padded``: the same samples unpacked, right-padded to the longest (one batch of all of them);
* ``causal``: the packed rows' tokens as plain causal rows of ``seq`` tokens (the issue's
  "unpacked causal rows x seq step"; attends across samples: timing only, its loss is not the
  samples' loss);
* ``hf`` (``--hf``, LoRA mode): stock Hugging Face + PEFT on the same weights (same dtype, LoRA
  r/alpha/targets, no dropout) fed by HF's padding-free ``DataCollatorWithFlattening`` (one row of
  all the samples with per-sample position ids; HF's SDPA builds the packed-sequence mask from
  them), HF's own loss.

Correctness first: the packed and padded losses (sum over target tokens) must agree (bf16: to 2%,
fp32: to 1e-4) before anything is timed. Target: packed >= 1.0x causal tokens/s (issue 20).

``epoch``: ``fastft train`` for one epoch of the bundled instruction set (``--train.epochs 1``),
``--data.packing true`` and ``false`` alternating, each in its own process, same seed; reports the
training time (sum of step times), target tokens per second and the final held-out loss of each.
Target: packed >= 1.8x faster with the same held-out loss within noise.

Prints a markdown section (machine, versions, command); the script appends it to
benchmarks/results/packing.md unless ``--no-write``, ``fastft bench --packing`` writes packing.md
in its ``--out`` folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

__all__ = ["epoch", "main", "step"]


def _machine() -> str:
    import torch
    import transformers

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}, "
            f"load average {load}")


def _command() -> str:
    """This process's command line (``fastft ...`` when the CLI re-executed itself with -c)."""
    head = "fastft" if sys.argv[0] == "-c" else f"python {os.path.relpath(sys.argv[0])}"
    return " ".join([head] + sys.argv[1:])


# ------------------------------------------------------------------------------------------------
# step
# ------------------------------------------------------------------------------------------------
def _batches(examples: list[dict], rows: int, seq: int, pad_id: int) -> dict:
    """The first samples that fill ``rows`` packed rows of ``seq`` tokens, as packed / padded /
    causal batches (see the module docstring)."""
    import torch

    from fastft.data.collate import Collator
    from fastft.data.packing import PackedCollator, pack_examples

    chosen, used = [], 0
    for e in examples:
        if len(e["input_ids"]) > seq:
            continue
        if used + len(e["input_ids"]) > rows * seq:
            break
        chosen.append(e)
        used += len(e["input_ids"])
    packed_rows = pack_examples(chosen, seq)
    if len(packed_rows) > rows:  # first-fit decreasing left a sample over: drop the shortest rows' samples
        keep = {id(x) for x in chosen}
        while len(packed_rows) > rows:
            keep.discard(id(min((x for x in chosen if id(x) in keep), key=lambda x: len(x["input_ids"]))))
            chosen = [x for x in chosen if id(x) in keep]
            packed_rows = pack_examples(chosen, seq)
    packed = PackedCollator(pad_id, pad_to_multiple_of=seq)(packed_rows)
    padded = Collator(pad_id)(chosen)
    causal = {"input_ids": packed["input_ids"], "labels": packed["labels"],
              "attention_mask": torch.ones_like(packed["input_ids"])}
    return {"packed": packed, "padded": padded, "causal": causal, "samples": len(chosen), "chosen": chosen}


def step(args, overrides: list[str]) -> str:
    import torch

    from fastft.config import load_config
    from fastft.train.cli import build
    from fastft.train.utils import CausalLMLoss

    cfg = load_config(None, ["--data.packing", "false", "--data.max_length", str(args.seq), *overrides])
    model, tok, bundle, _ = build(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    b = _batches(bundle.train, args.rows, args.seq, pad)
    loss_fn = CausalLMLoss(model, fused_ce=cfg.model.fused_ce, recompute_cheap=cfg.model.recompute_cheap).train()
    model.train()

    def run(name):
        batch = b[name]
        t0 = time.perf_counter()
        loss, n = loss_fn(**batch)
        (loss / n).backward()
        for p in model.parameters():
            p.grad = None
        return time.perf_counter() - t0, loss.item(), int(n)

    names = ["packed", "padded", "causal"]
    if args.hf:
        hf_run = _hf_padding_free(cfg, b["chosen"], next(model.parameters()).dtype)
        names.append("hf")
    ref = {name: (hf_run() if name == "hf" else run(name)) for name in names}  # warm-up and the check
    (_, lp, n_p), (_, lu, n_u) = ref["packed"][:3], ref["padded"][:3]
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    for other, (_, lo, n_o) in [("padded", ref["padded"]), *([("hf", ref["hf"])] if args.hf else [])]:
        if n_p != n_o or abs(lp - lo) > tol * abs(lo):
            raise SystemExit(f"packed and {other} batches disagree: loss sums {lp:.6f} vs {lo:.6f}, "
                             f"targets {n_p} vs {n_o}")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append((hf_run() if name == "hf" else run(name))[0])
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    shapes = {k: "x".join(map(str, b[k]["input_ids"].shape)) for k in times if k != "hf"}
    real = {k: int(b[k]["attention_mask"].sum()) for k in times if k != "hf"}
    if args.hf:
        shapes["hf"], real["hf"] = f"1x{real['packed']}", real["packed"]
    lines = [f"\n## Packed vs unpacked step ({time.strftime('%Y-%m-%d %H:%M')})\n",
             f"Command: `{_command()}`; {_machine()}; "
             f"{b['samples']} bundled samples, {n_p} target tokens; {args.rounds} alternating rounds of one "
             f"forward+backward each. Loss sums: " + ", ".join(f"{k} {v[1]:.5f}" for k, v in ref.items()
                                                                if k != "causal") + ".\n",
             "| batch | shape | real tokens | median s | target tokens/s | vs causal |", "|---|---|---|---|---|---|"]
    for k in times:
        lines.append(f"| {k} | {shapes[k]} | {real[k]} | {med[k]:.3f} | {n_p / med[k]:.0f} | "
                     f"{med['causal'] / med[k]:.2f}x |")
    lines.append(f"\nTarget (issue 20): packed >= 1.0x the causal step's tokens/s: "
                 f"{med['causal'] / med['packed']:.2f}x; packed vs padded {med['padded'] / med['packed']:.2f}x"
                 + (f"; vs HF + PEFT padding-free (target >= 2x): {med['hf'] / med['packed']:.2f}x" if args.hf else "")
                 + ".\n")
    return "\n".join(lines)


def _hf_padding_free(cfg, chosen: list[dict], dtype):
    """A step function for stock HF + PEFT on ``chosen`` via DataCollatorWithFlattening; returns
    (seconds, loss sum over target tokens, target tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    from fastft.models.loading import materialize

    if cfg.finetune.mode != "lora":
        raise SystemExit("--hf compares LoRA steps (finetune.mode=lora)")
    folder = materialize(cfg.model.path, cfg.model.gguf_file, dtype)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    hf = get_peft_model(hf, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                       target_modules=list(cfg.lora.target_modules),
                                       use_rslora=cfg.lora.use_rslora)).train()
    batch = DataCollatorWithFlattening(return_tensors="pt")(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in chosen])
    n = int((batch["labels"][:, 1:] != -100).sum())

    def run():
        t0 = time.perf_counter()
        # use_cache=False matters: with a cache (config.use_cache is on by default, train mode
        # too) transformers 5.25 skips its packed-sequence detection and the samples attend to
        # each other (measured: loss 242.12 vs 242.64 unpacked on the tiny test model)
        loss = hf(**batch, use_cache=False).loss
        loss.backward()
        for p in hf.parameters():
            p.grad = None
        return time.perf_counter() - t0, loss.item() * n, n

    return run


# ------------------------------------------------------------------------------------------------
# epoch
# ------------------------------------------------------------------------------------------------
def _train_once(packing: bool, args, overrides: list[str], workdir: str) -> dict:
    out = os.path.join(workdir, f"run-{'packed' if packing else 'unpacked'}-{time.time_ns()}")
    batch = args.packed_batch if packing else args.batch
    cmd = [sys.executable, "-m", "fastft.cli", "train", "--train.epochs", "1", "--train.batch_size", str(batch),
           "--data.packing", "true" if packing else "false", "--train.progress", "false",
           "--output.tensorboard", "false", "--output.dir", out, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    train = [x for x in lines if x.get("event") == "train"]
    evals = [x for x in lines if "eval_loss" in x]
    return {"train_s": sum(x["step_time"] for x in train), "targets": sum(x["target_tokens"] for x in train),
            "tokens": sum(x["tokens"] for x in train), "steps": len(train), "wall": time.perf_counter() - t0,
            "eval_loss": evals[-1]["eval_loss"] if evals else float("nan")}


def epoch(args, overrides: list[str]) -> str:
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as d:
        for r in range(args.rounds):
            for packing in ((True, False) if r % 2 == 0 else (False, True)):
                res = _train_once(packing, args, overrides, d)
                runs[packing].append(res)
                print(f"round {r} {'packed' if packing else 'unpacked'}: {res['steps']} steps, "
                      f"{res['train_s']:.1f} s training, eval loss {res['eval_loss']:.4f}", flush=True)
    med = {p: statistics.median(x["train_s"] for x in v) for p, v in runs.items()}
    lines = [f"\n## One epoch of the bundled instruction set, packed vs unpacked ({time.strftime('%Y-%m-%d %H:%M')})\n",
             f"Command: `{_command()}`; {_machine()}; "
             f"`fastft train --train.epochs 1`, each run its own process, {args.rounds} alternating rounds.\n",
             "| side | batch | steps | training s (median) | target tokens | target tokens/s | real tokens "
             "| held-out loss |",
             "|---|---|---|---|---|---|---|---|"]
    for p in (False, True):
        v = runs[p][-1]
        held_out = ", ".join(f"{x['eval_loss']:.4f}" for x in runs[p])
        lines.append(f"| {'packed' if p else 'unpacked'} | {args.packed_batch if p else args.batch} | {v['steps']} | "
                     f"{med[p]:.1f} | {v['targets']} | {v['targets'] / med[p]:.0f} | {v['tokens']} | {held_out} |")
    lines.append(f"\nTarget (issue 20): packed epoch >= 1.8x faster: {med[False] / med[True]:.2f}x.\n")
    return "\n".join(lines)


def main(results_dir: str | None = None) -> None:
    """The script's entry point (benchmarks/bench_packing.py passes its results folder)."""
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("step", "epoch"))
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=None, help="step: 10, epoch: 1")
    ap.add_argument("--batch", type=int, default=8, help="epoch: unpacked micro-batch (samples)")
    ap.add_argument("--packed-batch", type=int, default=8, help="epoch: packed micro-batch (rows)")
    ap.add_argument("--hf", action="store_true", help="step: also time stock HF + PEFT, padding-free")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (10 if args.what == "step" else 1)
    text = step(args, overrides) if args.what == "step" else epoch(args, overrides)
    print(text)
    if not args.no_write and results_dir:
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, "packing.md"), "a") as f:
            f.write(text + "\n")
