"""End-to-end effect of ``model.fused_blocks`` (fused RMSNorm/SwiGLU/RoPE) on ``fastft train``.

    python benchmarks/bench_e2e_fused_blocks.py [--rounds 3] [--steps 8] [-- extra fastft overrides]

Runs ``fastft train`` on the default model (SmolLM2-135M GGUF) and the bundled instruction data,
batch 4 x max_length 256, LoRA (the default mode), ``--model.fused_blocks true`` and ``false``
alternately (A/B/A/B, each in its own process), and compares the per-step ``step_time`` from
metrics.jsonl after ``--warmup`` steps. Both sides see the same batches (same seed), so the
ratio is taken per step and per round, then the median over everything. Final losses are printed
so a fast-but-wrong run shows. ``--mode step`` (part of the default ``both``) also times one
forward+backward of the model in one process, HF blocks vs fused blocks alternating, which is less
exposed to load changes between processes on a shared machine. Appends sections to
benchmarks/results/elementwise.md (run bench_elementwise.py first: it rewrites that file).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_once(fused: bool, args, extra: list[str], workdir: str) -> dict:
    out = os.path.join(workdir, f"run-{'on' if fused else 'off'}-{time.time_ns()}")
    cmd = [sys.executable, "-m", "fastft.cli", "train", "--train.max_steps", str(args.steps),
           "--train.batch_size", str(args.batch), "--data.max_length", str(args.seq),
           "--train.eval_batches", "1", "--train.progress", "false", "--output.tensorboard", "false",
           "--output.dir", out, "--model.fused_blocks", "true" if fused else "false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    train = [x for x in lines if x.get("event") == "train"]
    return {"step_time": [x["step_time"] for x in train], "loss": [x["loss"] for x in train],
            "tokens": [x["tokens"] for x in train], "wall": time.perf_counter() - t0}


def step_ab(args) -> str:
    """In one process: the default model in bf16, grads through every block (q/v projections
    trainable, like LoRA on q,v), one forward+backward per variant per round, alternating.
    Same inputs, same load conditions for both sides; also checks the losses agree."""
    import copy

    import torch

    from fastft.models import hf_fast
    from fastft.models.loading import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    hf, _, _ = load_model_and_tokenizer("default", dtype=torch.bfloat16)
    for n, p in hf.named_parameters():
        p.requires_grad_("q_proj" in n or "v_proj" in n)
    fused = copy.deepcopy(hf)
    hf_fast.patch_blocks(fused)
    ids = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step(model):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return time.perf_counter() - t0, loss.item()

    step(hf), step(fused)
    t = {"hf": [], "fused": []}
    losses = {}
    for r in range(args.step_rounds):
        for name in (("hf", "fused") if r % 2 == 0 else ("fused", "hf")):
            dt, losses[name] = step(hf if name == "hf" else fused)
            t[name].append(dt)
        print(f"step round {r}: hf {t['hf'][-1]:.3f} s, fused {t['fused'][-1]:.3f} s", flush=True)
    paired = statistics.median([a / b for a, b in zip(t["hf"], t["fused"])])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"\n## One training step in-process: HF blocks vs fused blocks\n\n"
            f"Command: `python benchmarks/bench_e2e_fused_blocks.py {' '.join(sys.argv[1:])}` (mode step: "
            f"SmolLM2-135M bf16, batch {args.batch} x {args.seq} random tokens, forward + backward with "
            f"q_proj/v_proj trainable, {args.step_rounds} alternating rounds, torch threads "
            f"{torch.get_num_threads()}; load average at the end {load})\n\n"
            f"| side | median s | min s |\n|---|---|---|\n"
            f"| HF blocks | {statistics.median(t['hf']):.3f} | {min(t['hf']):.3f} |\n"
            f"| fused blocks | {statistics.median(t['fused']):.3f} | {min(t['fused']):.3f} |\n\n"
            f"Speedup HF/fused: paired median {paired:.3f}, of minima {min(t['hf']) / min(t['fused']):.3f}. "
            f"Loss HF {losses['hf']:.5f}, fused {losses['fused']:.5f}.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mode", choices=("train", "step", "both"), default="both")
    ap.add_argument("--step-rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="mode step: torch threads (0 = default)")
    ap.add_argument("extra", nargs="*", help="extra fastft train overrides (after --)")
    args = ap.parse_args()
    if args.mode in ("step", "both"):
        text = step_ab(args)
        print(text)
        with open(os.path.join(RESULTS, "elementwise.md"), "a") as f:
            f.write(text)
    if args.mode == "step":
        return
    runs = {True: [], False: []}
    with tempfile.TemporaryDirectory() as wd:
        for r in range(args.rounds):
            for fused in ((True, False) if r % 2 == 0 else (False, True)):
                res = run_once(fused, args, args.extra, wd)
                runs[fused].append(res)
                st = res["step_time"][args.warmup:]
                print(f"round {r} fused_blocks={fused}: median step {statistics.median(st):.3f} s, "
                      f"losses {[round(x, 4) for x in res['loss']]}", flush=True)
    ratios, on_all, off_all = [], [], []
    for a, b in zip(runs[True], runs[False]):
        for x, y in zip(a["step_time"][args.warmup:], b["step_time"][args.warmup:]):
            ratios.append(y / x)
            on_all.append(x)
            off_all.append(y)
    tok = statistics.median(runs[True][0]["tokens"][args.warmup:])
    max_dloss = max(abs(x - y) / abs(y) for a, b in zip(runs[True], runs[False])
                    for x, y in zip(a["loss"], b["loss"]))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (f"\n## End to end: `fastft train` with `model.fused_blocks` true vs false\n\n"
            f"Command: `python benchmarks/bench_e2e_fused_blocks.py {' '.join(sys.argv[1:])}` "
            f"(default model SmolLM2-135M, LoRA, batch {args.batch} x max_length {args.seq}, "
            f"{args.steps} steps, first {args.warmup} dropped, {args.rounds} alternating rounds; "
            f"load average at the end {load})\n\n"
            f"| side | median step s | min step s | tokens/s (median step) |\n|---|---|---|---|\n"
            f"| fused_blocks=true | {statistics.median(on_all):.3f} | {min(on_all):.3f} | "
            f"{tok / statistics.median(on_all):.0f} |\n"
            f"| fused_blocks=false | {statistics.median(off_all):.3f} | {min(off_all):.3f} | "
            f"{tok / statistics.median(off_all):.0f} |\n\n"
            f"Per-step speedup (false/true, same batch): median {statistics.median(ratios):.3f}, "
            f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} step pairs. "
            f"Max relative loss difference between the sides, any step: {max_dloss:.2e}.\n")
    print(text)
    with open(os.path.join(RESULTS, "elementwise.md"), "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
