"""``fastft bench``: fastft against stock Hugging Face on the same model, data, seeds and settings.

Each side trains in its own subprocess (``fastft.bench_runners``), alternating HF, fastft, HF,
fastft, ... for ``--rounds`` rounds, on identical fixed-length rows (the bundled instruction data,
tokenised by fastft's data pipeline with prompts masked, concatenated and cut into ``--seq``-token
rows, so there is no padding and no per-sample masking on either side), in fastft's epoch order.
The first ``--warmup`` steps of every run are not timed.

Reported per side: median step time, non-padding tokens/s, peak RSS of the child process (its
own ``ru_maxrss`` after the last step), the loss curve, model-FLOPs utilisation against a bf16
GEMM rate measured in this run; then the ratios. The two loss curves must agree (see
``LOSS_RTOL``); when they do not, a FAIL line is printed and the exit code is 1.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from fastft.runtime import stock_env

# the children run without the caller's folder on sys.path (see fastft/runtime.py)
_RUNNER = "import sys; del sys.path[0]; from fastft.bench_runners import main; sys.exit(main(sys.argv[1:]))"

# Loss agreement (relative, per step). Both sides start from the same weights and see the same
# batches with the same constant lr, so the first loss differs only by bf16 rounding (HF: fp32
# masters under bf16 autocast, fastft: bf16 weights), and later losses drift apart only as much as
# that rounding (and a different LoRA-A draw) moves the trajectory. Measured on SmolLM2-135M LoRA:
# see benchmarks/README.md. A 10x lr on one side moves the curve by far more.
LOSS_RTOL_FIRST = 0.01  # step 1: same weights, same batch, only bf16 rounding differs
LOSS_RTOL = 0.03        # every step
TARGETS = {"lora": (2.0, 0.6), "int8": (2.0, 0.6), "full": (1.6, 0.7)}  # (tok/s ratio >=, RSS ratio <=)


def gemm_rate_bf16(n: int = 2048, reps: int = 5) -> float:
    """Median bf16 GEMM rate (FLOP/s) of an n x n x n matmul on this machine, now."""
    import torch

    a = torch.randn(n, n).bfloat16()
    b = torch.randn(n, n).bfloat16()
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts)


def model_flops_per_token(cfg, seq: int, mode: str) -> float:
    """Training FLOPs per token of a decoder: 2 per weight MAC forward, 2 more for the input
    gradient, 2 more for the weight gradient of trained weights (not in LoRA: the frozen base
    needs none), plus attention scores and values (4*L*d*seq forward, x3 with backward).
    lm_head is counted over every position, as the model defines it."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    kv = getattr(cfg, "num_key_value_heads", heads) * hd
    ff = cfg.intermediate_size
    per_layer = d * heads * hd * 2 + d * kv * 2 + 3 * d * ff  # q, o, k, v, gate/up/down MACs
    macs = L * per_layer + d * cfg.vocab_size
    mult = 6 if mode == "full" else 4
    attn = 3 * 4 * L * heads * hd * seq
    return mult * macs + attn


def machine_info() -> dict:
    from fastft._backend import describe

    info = describe()
    info["cores"] = os.cpu_count()
    info["load_avg"] = list(os.getloadavg())
    info["machine"] = platform.machine()
    return info


def prepare(model: str, seq: int, n_rows: int, out: Path, seed: int) -> tuple[str, dict]:
    """Materialise the model as local HF folders (``{"fp32": ..., "bf16": ...}``: for a GGUF source
    the bf16 one is fastft's 16-bit cache copy, for a folder both are the folder) and write the
    shared rows. Returns (folders, data stats)."""
    import torch

    from fastft.config import DataConfig
    from fastft.data import build_datasets
    from fastft.model_loading import load_tokenizer, materialize
    from fastft.trainer import epoch_order

    folder = materialize(model)
    tok = load_tokenizer(folder)
    folders = {"fp32": folder, "bf16": materialize(model, dtype=torch.bfloat16)}
    dcfg = DataConfig(max_length=seq, val_ratio=0.0, cache=False)
    bundle = build_datasets(dcfg, tok, seed=seed)
    ids: list[int] = []
    labels: list[int] = []
    for e in bundle.train:
        ids += e["input_ids"]
        labels += e["labels"]
    n_tok = len(ids)
    if n_tok < seq:
        raise click.ClickException(f"the bundled data gives only {n_tok} tokens, fewer than --seq {seq}")
    rows_avail = n_tok // seq
    idx = [i % rows_avail for i in range(n_rows)]  # repeat the data when the run needs more rows
    t_ids = torch.tensor(ids[:rows_avail * seq]).view(rows_avail, seq)[idx]
    t_lab = torch.tensor(labels[:rows_avail * seq]).view(rows_avail, seq)[idx]
    # a row must have a target after the shift; a row of only prompt tokens is rare but possible
    t_lab[:, -1] = torch.where((t_lab[:, 1:] != -100).any(1), t_lab[:, -1], t_ids[:, -1])
    # fastft's Trainer draws the rows in this order (epoch 0); the HF side reads them in it sequentially
    torch.save({"input_ids": t_ids.clone(), "labels": t_lab.clone(), "order": epoch_order(n_rows, seed, 0)}, out)
    stats = {"examples": len(bundle.train), "tokens": n_tok, "distinct_rows": rows_avail, "rows": n_rows,
             "target_fraction": float((t_lab[:, 1:] != -100).float().mean())}
    return folders, stats


def run_child(spec: dict, out: Path, log: Path) -> dict:
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    with open(log, "w") as f:
        # each side runs as its users run it: fastft with what the fastft command sets up
        # (fastft/runtime.py), HF with the environment the user started fastft with
        env = dict(os.environ) if spec["side"] == "fastft" else stock_env(dict(os.environ))
        rc = subprocess.call([sys.executable, "-c", _RUNNER, str(spec_path), str(out)],
                             stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not out.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise click.ClickException(f"{spec['side']} run failed (exit {rc}); log {log}:\n{tail}")
    return json.loads(out.read_text())


def loss_check(hf: list[float], ff: list[float], rtol_first: float, rtol: float) -> tuple[bool, str]:
    """Per-step relative agreement of two loss curves of the same length."""
    if len(hf) != len(ff) or not hf:
        return False, f"loss curves have {len(hf)} (HF) and {len(ff)} (fastft) points"
    rel = [abs(a - b) / max(abs(a), 1e-6) for a, b in zip(hf, ff)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    ok = rel[0] <= rtol_first and max(rel) <= rtol
    return ok, (f"first-step rel diff {rel[0]:.4f} (tol {rtol_first}), max rel diff {rel[worst]:.4f} at step "
                f"{worst + 1} (tol {rtol}): HF {hf[worst]:.4f} vs fastft {ff[worst]:.4f}")


def summarise(runs: list[dict], warmup: int) -> dict:
    steady = [t for r in runs for t in r["step_times"][warmup:]]
    toks = [k for r in runs for k in r["tokens"][warmup:]]
    med = statistics.median(steady)
    tps = statistics.median([k / t for k, t in zip(toks, steady)])
    return {"median_step_s": med, "tokens_per_s": tps, "best_step_s": min(steady), "peak_rss_mb": statistics.median([r["peak_rss_mb"] for r in runs]),
            "peak_rss_mb_runs": [r["peak_rss_mb"] for r in runs], "step_times": steady,
            "losses": runs[0]["losses"], "losses_all_rounds": [r["losses"] for r in runs],
            "settings": runs[0]["settings"], "notes": runs[0]["notes"], "threads": runs[0]["threads"]}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hf, ff = res["hf"], res["fastft"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    names, colors = ["HF", "fastft"], ["#888888", "#d9534f"]
    ax[0].bar(names, [hf["tokens_per_s"], ff["tokens_per_s"]], color=colors)
    ax[0].set_title(f"tokens/s (x{res['ratios']['tokens_per_s']:.2f})")
    ax[1].bar(names, [hf["peak_rss_mb"] / 1024, ff["peak_rss_mb"] / 1024], color=colors)
    ax[1].set_title(f"peak RSS GB (x{res['ratios']['peak_rss']:.2f})")
    steps = range(1, len(hf["losses"]) + 1)
    ax[2].plot(steps, hf["losses"], "o-", color=colors[0], label="HF")
    ax[2].plot(range(1, len(ff["losses"]) + 1), ff["losses"], "s--", color=colors[1], label="fastft")
    ax[2].set_title("training loss: " + ("agree" if res["loss_check"]["ok"] else "DISAGREE"))
    ax[2].set_xlabel("step")
    ax[2].legend()
    a = res["args"]
    fig.suptitle(f"{a['mode']} {Path(a['model']).name} batch {a['batch']}x{a['seq']} ({res['machine']['processor']}, "
                 f"{res['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def append_history(path: Path, res: dict) -> None:
    a, hf, ff, r = res["args"], res["hf"], res["fastft"], res["ratios"]
    row = {"time": res["time"], "mode": a["mode"], "model": a["model"], "batch": a["batch"], "seq": a["seq"],
           "steps": a["steps"], "rounds": a["rounds"], "hf_tok_s": round(hf["tokens_per_s"], 2),
           "fastft_tok_s": round(ff["tokens_per_s"], 2), "speedup": round(r["tokens_per_s"], 3),
           "hf_rss_mb": round(hf["peak_rss_mb"]), "fastft_rss_mb": round(ff["peak_rss_mb"]),
           "rss_ratio": round(r["peak_rss"], 3), "fastft_mfu": round(ff["mfu"], 4), "loss_ok": res["loss_check"]["ok"],
           "load_avg": round(res["machine"]["load_avg"][0], 2), "torch": res["machine"]["torch"],
           "transformers": res["machine"]["transformers"]}
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


@click.command()
@click.option("--model", default="default", show_default=True, help="model.path: local HF folder, .gguf, or 'default'")
@click.option("--mode", type=click.Choice(["lora", "full", "int8"]), default="lora", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seq", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=6, show_default=True, help="timed steps per run")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="untimed steps first")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="HF/fastft run pairs (the speed ratio is the median of the per-round ratios)")
@click.option("--lr", type=float, default=None,
              help="constant lr on both sides [default: 2e-4 for lora/int8, 2e-5 for full]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads per child (0 = default)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output directory (default runs/bench-<mode>-<time>)")
@click.option("--history", type=click.Path(dir_okay=False), default=None,
              help="CSV history file (default: bench_history.csv next to the output directory)")
@click.option("--hf-base-dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="HF weights: auto = bf16 frozen base for lora/int8 (PEFT's fp32 adapters), fp32 for full; "
                   "bf16 autocast either way")
@click.option("--fastft-override", multiple=True, metavar="KEY=VALUE",
              help="extra fastft config override for the fastft side (e.g. model.fused_ce=false)")
def bench(model, mode, batch, seq, steps, warmup, rounds, lr, seed, threads, out_dir, history, hf_base_dtype,
          fastft_override):
    """Compare fastft with stock Hugging Face (Trainer + PEFT) on identical data, seeds and settings.

    Each side trains in its own process, alternating for ROUNDS rounds; prints median step time,
    non-padding tokens/s, peak RSS, MFU and the ratios, checks that the loss curves agree, and
    writes results.json, plot.png and a history CSV row.
    """
    import importlib.util

    from fastft.model_loading import materialize  # noqa: F401 - fail early if fastft is broken

    if lr is None:
        # full fine-tuning at a LoRA lr (2e-4) takes sign-like first Adam steps of 2e-4 on every
        # weight: the loss falls 25% in one step and bf16 rounding alone moved the curves 6-14%
        # apart (measured, benchmarks/README.md); 2e-5 is a usual full fine-tuning lr
        lr = 2e-5 if mode == "full" else 2e-4
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir or f"runs/bench-{mode}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    hist = Path(history) if history else out.parent / "bench_history.csv"
    total = warmup + steps
    info = machine_info()
    click.echo(f"machine: {info['processor']}, {info['cores']} cores, load average {info['load_avg'][0]:.2f}; "
               f"python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
               f"peft {info['peft']}")
    click.echo("fastft backends: " + ", ".join(f"{k}={v}" for k, v in info["ops"].items()))
    folders, stats = prepare(model, seq, total * batch, out / "rows.pt", seed)
    folder = folders["fp32"]
    if Path(model).exists():  # the children may resolve a relative path elsewhere
        model = str(Path(model).resolve())
    click.echo(f"model {folder}; data: {stats['rows']} rows of {seq} tokens from {stats['examples']} bundled "
               f"examples ({stats['target_fraction']:.0%} of positions carry loss), same rows and order on both sides")
    hf_int8 = "bitsandbytes" if importlib.util.find_spec("bitsandbytes") else "none"
    if mode == "int8" and hf_int8 == "none":
        click.echo("note: bitsandbytes is not installed: the HF side runs its bf16 LoRA path (no int8)")
    rate = gemm_rate_bf16()
    click.echo(f"bf16 GEMM rate (2048^3, now): {rate / 1e9:.0f} GFLOP/s (each run measures its own again)")
    # fastft loads the model exactly as `fastft train --model.path MODEL` does; HF gets the folder
    base = {"model": model, "hf_models": folders, "hf_base_dtype": hf_base_dtype, "mode": mode, "batch": batch,
            "seq": seq, "total_steps": total, "lr": lr,
            "seed": seed, "data": str(out / "rows.pt"), "threads": threads, "hf_int8": hf_int8,
            "fastft_overrides": list(fastft_override)}
    runs: dict[str, list[dict]] = {"hf": [], "fastft": []}
    for r in range(rounds):
        for side in ("hf", "fastft"):
            spec = {**base, "side": side, "run_dir": str(out / f"{side}-run{r}")}
            res = run_child(spec, out / f"{side}-{r}.json", out / f"{side}-{r}.log")
            runs[side].append(res)
            st = sorted(res["step_times"][warmup:])
            click.echo(f"round {r + 1}/{rounds} {side:>6}: median step {statistics.median(st):.3f} s, "
                       f"peak RSS {res['peak_rss_mb']:.0f} MB, load avg {res['load_avg_end']:.1f}, loss {res['losses'][0]:.4f} -> {res['losses'][-1]:.4f}")
    from transformers import AutoConfig

    fpt = model_flops_per_token(AutoConfig.from_pretrained(folder), seq, mode)
    res = {"time": stamp, "args": {"model": folder, "mode": mode, "batch": batch, "seq": seq, "steps": steps,
                                   "warmup": warmup, "rounds": rounds, "lr": lr, "seed": seed,
                                   "hf_base_dtype": hf_base_dtype, "fastft_overrides": list(fastft_override)},
           "machine": info, "data": stats, "gemm_bf16_flops": rate, "model_flops_per_token": fpt}
    best_rate = max([rate] + [x.get("gemm_bf16_flops", 0.0) for v in runs.values() for x in v])
    res["gemm_bf16_flops_best"] = best_rate
    for side in ("hf", "fastft"):
        s = summarise(runs[side], warmup)
        # MFU against the best bf16 GEMM rate measured in this run (the parent's and each child's
        # right before training): one loaded sample gave a rate so low that MFU read 114%
        s["mfu"] = s["tokens_per_s"] * fpt / best_rate
        res[side] = s
    hf, ff = res["hf"], res["fastft"]
    # the machine's load changes between rounds: pair each fastft run with the HF run just before
    # it and take the median of the per-round ratios (a pooled median mixes loads)
    per_round = [statistics.median(h["step_times"][warmup:]) / statistics.median(f["step_times"][warmup:])
                 for h, f in zip(runs["hf"], runs["fastft"])]
    res["ratios"] = {"tokens_per_s": statistics.median(per_round), "tokens_per_s_per_round": per_round,
                     "best_step": hf["best_step_s"] / ff["best_step_s"],
                     "pooled_tokens_per_s": ff["tokens_per_s"] / hf["tokens_per_s"],
                     "peak_rss": ff["peak_rss_mb"] / hf["peak_rss_mb"],
                     "load_avg_per_run": {k: [x["load_avg_end"] for x in v] for k, v in runs.items()}}
    ok, msg = loss_check(hf["losses"], ff["losses"], LOSS_RTOL_FIRST, LOSS_RTOL)
    res["loss_check"] = {"ok": ok, "detail": msg, "rtol_first": LOSS_RTOL_FIRST, "rtol": LOSS_RTOL}
    tgt_speed, tgt_mem = TARGETS[mode]
    res["targets"] = {"tokens_per_s_ratio_min": tgt_speed, "peak_rss_ratio_max": tgt_mem,
                      "met": res["ratios"]["tokens_per_s"] >= tgt_speed and res["ratios"]["peak_rss"] <= tgt_mem}
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    append_history(hist, res)
    from fastft.plot import NO_MATPLOTLIB, have_matplotlib

    drew = have_matplotlib()  # optional: the results above are already written
    if drew:
        plot(res, out / "plot.png")
    click.echo(f"{'side':<8}{'step s':>9}{'best s':>9}{'tok/s':>9}{'RSS MB':>9}{'MFU':>8}  settings")
    for side, name in (("hf", "HF"), ("fastft", "fastft")):
        s = res[side]
        click.echo(f"{name:<8}{s['median_step_s']:>9.3f}{s['best_step_s']:>9.3f}{s['tokens_per_s']:>9.1f}{s['peak_rss_mb']:>9.0f}"
                   f"{s['mfu']:>8.1%}  {s['settings']}")
        for n in s["notes"]:
            click.echo(f"        note: {n}")
    r = res["ratios"]
    click.echo(f"fastft/HF: tokens/s x{r['tokens_per_s']:.2f} (median of per-round ratios "
               f"{', '.join(f'{x:.2f}' for x in r['tokens_per_s_per_round'])}; fastest steps x{r['best_step']:.2f}; "
               f"target >= {tgt_speed}), peak RSS x{r['peak_rss']:.2f} "
               f"(target <= {tgt_mem}); targets {'met' if res['targets']['met'] else 'NOT met'}")
    click.echo(f"HF loss:     {' '.join(f'{x:.4f}' for x in hf['losses'])}")
    click.echo(f"fastft loss: {' '.join(f'{x:.4f}' for x in ff['losses'])}")
    click.echo(f"wrote {out / 'results.json'}, {out / 'plot.png' if drew else '(no plot)'}, appended {hist}")
    if not drew:
        click.echo(NO_MATPLOTLIB.replace("fastft plot RUN_DIR", "rerun for plot.png"))
    if not ok:
        click.echo(f"FAIL: loss curves disagree: {msg}")
        raise SystemExit(1)
    click.echo(f"PASS: loss curves agree: {msg}")
