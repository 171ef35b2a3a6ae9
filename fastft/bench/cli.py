"""``fastft bench``: fastft against stock Hugging Face on the same model, data, seeds and settings.

Each side trains in its own subprocess (``fastft.bench.runners``): fastft, HF Trainer (+ PEFT)
eager and, when asked, HF with ``torch_compile=True`` (``--hf-compile``) or Liger kernels
(``--hf-liger``, CUDA). Rounds alternate the order ABBA (HF..., fastft, then fastft, ...HF) so that
neither side always runs first on a warming or cooling machine. Per workload (``--workload``:
``instruction`` = prompt-masked chat data, ``text`` = plain text with every position a target;
``fastft.bench.data``) both sides get identical fixed-length rows in fastft's epoch order. The first
``--warmup`` (>= 2) steps of every run are not timed (for HF + compile they hold the compile time,
which is reported separately).

Identical process settings: both children get the same threads and the malloc page setting chosen
by ``--malloc`` (``stock``: each side as its users get it out of the box - the ``fastft`` command
puts glibc malloc on transparent huge pages, ``fastft/runtime.py``, stock HF does not;
``huge``/``default``: both sides the same); each child records what it ran with in results.json.

Reported per workload and side: median step time, tokens/s, peak memory (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), the loss curve, model-FLOPs utilisation (MFU: the
standard count, every position through the LM head, the same numerator for every side) against a
dense GEMM rate measured in the same run, and fastft's executed FLOPs where they differ (its head
runs only on target positions); then fastft's ratio against every baseline, the headline being
against the fastest baseline measured. Every loss curve must agree with fastft's (see
``bench_report.LOSS_RTOL``); when one does not, a FAIL line is printed and the exit code is 1.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from fastft.bench.report import (BASELINE_NAMES, LOSS_RTOL, LOSS_RTOL_FIRST, append_history, compare,
                                 executed_flops_per_token, history_rows, loss_check, model_flops_per_token,
                                 plot, summarise)
from fastft.runtime import TUNABLE, hugepage_env, stock_env

__all__ = ["bench", "loss_check", "model_flops_per_token", "child_env", "round_order"]

# the children run without the caller's folder on sys.path (see fastft/runtime.py)
_RUNNER = "import sys; del sys.path[0]; from fastft.bench.runners import main; sys.exit(main(sys.argv[1:]))"
MALLOC_CHOICES = ("stock", "huge", "default")


def with_hugetlb(env: dict[str, str], on: bool) -> dict[str, str]:
    """``env`` with glibc malloc's huge-page tunable set (``on``) or removed (glibc's default)."""
    out = dict(env)
    parts = [x for x in out.get("GLIBC_TUNABLES", "").split(":") if x and not x.startswith("glibc.malloc.hugetlb")]
    if on:
        parts.append(TUNABLE)
    if parts:
        out["GLIBC_TUNABLES"] = ":".join(parts)
    else:
        out.pop("GLIBC_TUNABLES", None)
    return out


def child_env(side: str, malloc: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of one child. ``malloc``: ``stock`` = each side as its users get it (fastft:
    what the ``fastft`` command sets up from the user's environment; HF: the user's environment
    itself), ``huge`` / ``default`` = both sides with / without malloc on huge pages."""
    user = stock_env(env)  # as the user started fastft, before its own re-exec
    if malloc == "huge":
        return with_hugetlb(user, True)
    if malloc == "default":
        return with_hugetlb(user, False)
    if side == "fastft":
        return hugepage_env(user) or user  # exactly what the fastft command's re-exec runs with
    return user


def round_order(sides: list[str], r: int) -> list[str]:
    """ABBA: baselines first in even rounds, fastft first (baselines reversed) in odd ones."""
    return list(sides) if r % 2 == 0 else list(reversed(sides))


def machine_info(device: str) -> dict:
    from fastft._backend import describe

    info = describe()
    info["cores"] = os.cpu_count()
    info["load_avg"] = list(os.getloadavg())
    info["machine"] = platform.machine()
    # on CUDA the children name the GPU: asking here would create a CUDA context in this process
    info["device_name"] = "GPU (named by the children)" if device == "cuda" else info.get("processor", platform.processor())
    return info


def run_child(spec: dict, out: Path, log: Path, env: dict[str, str]) -> dict:
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-c", _RUNNER, str(spec_path), str(out)],
                             stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not out.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise click.ClickException(f"{spec['side']} run failed (exit {rc}); log {log}:\n{tail}")
    return json.loads(out.read_text())


def check_request(device: str, hf_liger: bool) -> None:
    """Refuse what cannot run, in one line, before anything expensive (exit 2)."""
    import importlib.util

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException(f"--device cuda: no CUDA device is available here (torch {torch.__version__}, "
                                       f"built for CUDA {torch.version.cuda})")
    if hf_liger:
        if device != "cuda":
            raise click.ClickException("--hf-liger: Liger's kernels are Triton GPU kernels; use it with --device cuda")
        if importlib.util.find_spec("liger_kernel") is None:
            raise click.ClickException("--hf-liger: liger-kernel is not installed (pip install liger-kernel)")


@click.command()
@click.option("--model", default="default", show_default=True,
              help="model.path: local HF folder, .gguf, or 'default' (with --model-config: only its tokenizer is used)")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None,
              help="a transformers config.json: train a randomly initialised model of these shapes instead "
                   "(e.g. benchmarks/configs/llama-3.2-1b.json)")
@click.option("--mode", type=click.Choice(["lora", "full", "int8"]), default="lora", show_default=True)
@click.option("--workload", type=click.Choice(["instruction", "text", "both"]), default="both", show_default=True,
              help="instruction: prompt-masked chat data (~17% of positions are targets); text: plain text, "
                   "every position a target")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="both sides on this device")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seq", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=6, show_default=True, help="timed steps per run")
@click.option("--warmup", type=click.IntRange(min=2), default=2, show_default=True,
              help="untimed steps first (>= 2: allocator, autotuning, compilation)")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="rounds of one run per side, ABBA order (the speed ratio is the median of the per-round ratios)")
@click.option("--hf-compile", is_flag=True, help="also run HF Trainer with torch_compile=True (compile time "
              "reported, not timed)")
@click.option("--hf-liger", is_flag=True, help="also run HF Trainer with use_liger_kernel=True (CUDA, needs liger-kernel)")
@click.option("--malloc", type=click.Choice(MALLOC_CHOICES), default="stock", show_default=True,
              help="glibc malloc pages: stock = each side as its users get it (fastft: huge pages, HF: the "
                   "environment as is); huge / default = both sides with / without huge pages")
@click.option("--lr", type=float, default=None,
              help="constant lr on every side [default: 2e-4 for lora/int8, 2e-5 for full]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="torch threads per child (0 = this process's default, the same for every side)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="output directory (default runs/bench-<mode>-<time>)")
@click.option("--history", type=click.Path(dir_okay=False), default=None,
              help="CSV history file (default: bench_history.csv next to the output directory)")
@click.option("--hf-base-dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="HF weights: auto = bf16 frozen base for lora/int8 (PEFT's fp32 adapters), fp32 for full; "
                   "bf16 autocast either way")
@click.option("--fastft-override", multiple=True, metavar="KEY=VALUE",
              help="extra fastft config override for the fastft side (e.g. model.fused_ce=false)")
@click.option("--packing", is_flag=True,
              help="packed rows instead: fastft packed vs padded vs causal vs HF + PEFT padding-free "
                   "(DataCollatorWithFlattening) on the same bundled samples, one process, target tokens/s "
                   "(BATCH rows of SEQ tokens); then one epoch of the bundled set packed vs unpacked "
                   "(fastft/bench/packing.py)")
def bench(model, model_config, mode, workload, device, batch, seq, steps, warmup, rounds, hf_compile, hf_liger,
          malloc, lr, seed, threads, out_dir, history, hf_base_dtype, fastft_override, packing):
    """Compare fastft with stock Hugging Face (Trainer + PEFT) on identical data, seeds and settings.

    Each side trains in its own process, ABBA-alternating for ROUNDS rounds, on each WORKLOAD;
    prints median step time, tokens/s, peak memory, MFU and fastft's ratio against every baseline,
    checks that the loss curves agree, and writes results.json, a plot per workload and history rows.
    """
    import importlib.util

    check_request(device, hf_liger)
    if packing:
        return _bench_packing(model, mode, device, batch, seq, rounds, seed, threads, out_dir, fastft_override)
    import torch

    from fastft.bench.data import WORKLOAD_NAMES, build_rows
    from fastft.bench.model import prepare_models

    if lr is None:
        # full fine-tuning at a LoRA lr (2e-4) takes sign-like first Adam steps of 2e-4 on every
        # weight: the loss falls 25% in one step and bf16 rounding alone moved the curves 6-14%
        # apart (measured, benchmarks/README.md); 2e-5 is a usual full fine-tuning lr
        lr = 2e-5 if mode == "full" else 2e-4
    workloads = list(WORKLOAD_NAMES) if workload == "both" else [workload]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir or f"runs/bench-{mode}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    hist = Path(history) if history else out.parent / "bench_history.csv"
    total = warmup + steps
    threads = threads or torch.get_num_threads()  # one number for every child, recorded
    info = machine_info(device)
    click.echo(f"machine: {info['processor']}, {info['cores']} cores, load average {info['load_avg'][0]:.2f}; "
               f"device {device} ({info['device_name']}); python {info['python']}, torch {info['torch']}, "
               f"transformers {info['transformers']}, peft {info['peft']}")
    click.echo("fastft backends: " + ", ".join(f"{k}={v}" for k, v in info["ops"].items()))
    folders, tok, minfo = prepare_models(model, model_config, seed)
    folder = minfo["folder"]
    if model_config:
        model = folder  # fastft loads the saved random-init folder as `fastft train --model.path` would
    elif Path(model).exists():  # the children may resolve a relative path elsewhere
        model = str(Path(model).resolve())
    click.echo(f"model: {minfo['source']} ({folder}); tokens from {minfo['tokenizer']}")
    hf_int8 = "bitsandbytes" if importlib.util.find_spec("bitsandbytes") else "none"
    if mode == "int8" and hf_int8 == "none":
        click.echo("note: bitsandbytes is not installed: the HF side runs its bf16 LoRA path (no int8)")
    sides = ["hf"] + (["hf_compile"] if hf_compile else []) + (["hf_liger"] if hf_liger else []) + ["fastft"]
    envs = {s: child_env(s, malloc, dict(os.environ)) for s in sides}
    rate = gemm_rates_parent(device)
    click.echo(f"threads per child: {threads}; malloc: {malloc} (" + ", ".join(
        f"{BASELINE_NAMES.get(s, 'fastft')}: {'huge pages' if 'hugetlb=1' in envs[s].get('GLIBC_TUNABLES', '') else 'default pages'}"
        for s in sides) + "); round order ABBA")
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(folder)
    res = {"time": stamp, "args": {"model": folder, "model_config": model_config, "mode": mode, "device": device,
                                   "workloads": workloads, "batch": batch, "seq": seq, "steps": steps,
                                   "warmup": warmup, "rounds": rounds, "lr": lr, "seed": seed, "threads": threads,
                                   "malloc": malloc, "hf_compile": hf_compile, "hf_liger": hf_liger,
                                   "hf_base_dtype": hf_base_dtype, "fastft_overrides": list(fastft_override)},
           "machine": info, "model": minfo, "gemm_flops_parent": rate, "sides": sides,
           "loss_tolerance": {"first_step_rel": LOSS_RTOL_FIRST, "every_step_rel": LOSS_RTOL}, "workloads": {}}
    base = {"model": model, "hf_models": folders, "hf_base_dtype": hf_base_dtype, "mode": mode, "batch": batch,
            "seq": seq, "total_steps": total, "lr": lr, "device": device, "seed": seed, "threads": threads,
            "hf_int8": hf_int8, "fastft_overrides": list(fastft_override)}
    for wl in workloads:
        res["workloads"][wl] = run_workload(wl, base, sides, envs, out, rounds, warmup, mcfg, minfo, tok, rate,
                                            device, mode, build_rows)
        if device == "cuda":
            info["device_name"] = res["workloads"][wl]["sides"]["fastft"]["settings"].get("device_name", "?")
    # the pre-workload layout, for readers of older results (benchmarks/gpu_check_report.py): the
    # first workload's HF-eager comparison, named as such
    w0 = res["workloads"][workloads[0]]
    res.update({"legacy_view": f"workload {workloads[0]}, fastft vs HF eager", "hf": w0["sides"]["hf"],
                "fastft": w0["sides"]["fastft"], "loss_check": w0["baselines"]["hf"]["loss_check"],
                "ratios": {"tokens_per_s": w0["baselines"]["hf"]["tokens_per_s"],
                           "peak_mem": w0["baselines"]["hf"]["peak_mem"]}})
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    append_history(hist, history_rows(res))
    for wl in workloads:
        click.echo(plot(res, wl, out / f"plot-{wl}.png"))
    click.echo(f"wrote {out / 'results.json'}, appended {hist}")
    failed = [wl for wl in workloads if not res["workloads"][wl]["loss_ok"]]
    for wl in workloads:
        w = res["workloads"][wl]
        for b, c in w["baselines"].items():
            word = "PASS: loss curves agree" if c["loss_check"]["ok"] else "FAIL: loss curves disagree"
            click.echo(f"{w['prefix']} {word} ({c['name']} vs fastft): {c['loss_check']['detail']}")
    if failed:
        raise SystemExit(1)


def _bench_packing(model, mode, device, batch, seq, rounds, seed, threads, out_dir, overrides) -> None:
    """``--packing``: fastft/bench/packing.py's step (with the HF padding-free side) and epoch
    comparisons; prints them and writes packing.md under ``--out``."""
    import types

    from fastft.bench.packing import epoch, step

    fastft_args = ["--model.path", model, "--finetune.mode", "lora" if mode == "int8" else mode,
                   "--train.device", device, "--train.seed", str(seed), "--data.max_length", str(seq)]
    fastft_args += (["--lora.int8_base", "true"] if mode == "int8" else [])
    fastft_args += (["--train.threads", str(threads)] if threads else [])
    for kv in overrides:
        key, _, value = kv.partition("=")
        fastft_args += [f"--{key}", value]
    args = types.SimpleNamespace(rows=batch, seq=seq, rounds=max(rounds, 2) * 3, hf=mode != "full",
                                 batch=8, packed_batch=8)
    text = step(args, fastft_args)
    click.echo(text)
    args.rounds = rounds
    text += "\n" + epoch(args, fastft_args)
    click.echo(text.split("\n## ")[-1])
    out = Path(out_dir or f"runs/bench-packing-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "packing.md").write_text(text + "\n")
    click.echo(f"wrote {out / 'packing.md'}")


def gemm_rates_parent(device: str) -> dict:
    """The parent's own GEMM rate on CPU (each child measures again right before it trains); on
    CUDA only the children measure, so that this process holds no CUDA context beside them."""
    if device == "cuda":
        return {}
    from fastft.bench.runners import gemm_rates

    return gemm_rates("cpu")


def run_workload(wl, base, sides, envs, out, rounds, warmup, mcfg, minfo, tok, rate, device, mode, build_rows) -> dict:
    """All rounds of one workload; prints its lines (each names the workload and its target
    fraction) and returns its part of results.json."""
    try:
        stats = build_rows(wl, tok, base["seq"], base["total_steps"] * base["batch"], base["seed"],
                           out / f"rows-{wl}.pt", model_vocab=minfo["vocab"])
    except ValueError as e:  # too little data for one row of --seq tokens
        raise click.ClickException(str(e)) from None
    prefix = f"[{wl}, {stats['target_fraction']:.0%} targets]"
    click.echo(f"{prefix} data: {stats['rows']} rows of {base['seq']} tokens from {stats['examples']} bundled examples "
               f"({stats['distinct_rows']} distinct), {stats['ids']}; same rows and order on every side")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(rounds):
        for side in round_order(sides, r):
            spec = {**base, "side": side, "data": str(out / f"rows-{wl}.pt"), "run_dir": str(out / f"{wl}-{side}-run{r}")}
            rec = run_child(spec, out / f"{wl}-{side}-{r}.json", out / f"{wl}-{side}-{r}.log", envs[side])
            runs[side].append(rec)
            st = sorted(rec["step_times"][warmup:])
            click.echo(f"{prefix} round {r + 1}/{rounds} {BASELINE_NAMES.get(side, 'fastft'):>18}: median step "
                       f"{statistics.median(st):.3f} s, peak mem {rec['peak_mem_mb']:.0f} MB, malloc "
                       f"{rec['settings']['malloc']}, threads {rec['threads']}, load avg {rec['load_avg_end']:.1f}, "
                       f"loss {rec['losses'][0]:.4f} -> {rec['losses'][-1]:.4f}")
    fpt = model_flops_per_token(mcfg, base["seq"], mode)
    efpt = executed_flops_per_token(mcfg, base["seq"], mode, stats["target_fraction"])
    # MFU against the best dense GEMM rate measured in this run (the parent's and each child's right
    # after training; on CPU the better of bf16 and fp32): one loaded sample once read 114% MFU
    best_rate = max([max(rate.values(), default=0.0)] +
                    [max(x["gemm_flops"].values()) for v in runs.values() for x in v])
    sides_out = {}
    for side in sides:
        sm = summarise(runs[side], warmup)
        sm["mfu"] = sm["tokens_per_s"] * fpt / best_rate
        if side == "fastft":
            sm["executed_flops_per_token"] = efpt
            sm["executed_flops_utilisation"] = sm["tokens_per_s"] * efpt / best_rate
        sides_out[side] = sm
    cmp = compare(device, mode, wl, sides_out, runs, warmup)
    w = {"data": stats, "prefix": prefix, "sides": sides_out, "model_flops_per_token": fpt,
         "mfu_definition": ("model-FLOPs utilisation: tokens/s x model_flops_per_token (every position through "
                            "the LM head, the same for every side) / gemm_flops_best; fastft's "
                            "executed_flops_utilisation uses the FLOPs it executes (head on target positions)"),
         "fastft_executed_flops_per_token": efpt, "gemm_flops_best": best_rate, **cmp}
    malloc_by_side = {s: sorted({x["settings"]["malloc"] for x in runs[s]}) for s in sides}
    threads_by_side = {s: sorted({x["threads"] for x in runs[s]}) for s in sides}
    w["process_settings"] = {"malloc": malloc_by_side, "threads": threads_by_side,
                             "same_malloc": len({tuple(v) for v in malloc_by_side.values()}) == 1,
                             "same_threads": len({tuple(v) for v in threads_by_side.values()}) == 1}
    print_workload(w, mode, device)
    return w


def print_workload(w: dict, mode: str, device: str) -> None:
    p, sides = w["prefix"], w["sides"]
    mem = sides["fastft"]["memory_measure"]
    click.echo(f"{p} {'side':<20}{'step s':>9}{'best s':>9}{'tok/s':>10}{'peak MB':>10}{'MFU':>8}  settings")
    for side, s in sides.items():
        click.echo(f"{p} {BASELINE_NAMES.get(side, 'fastft'):<20}{s['median_step_s']:>9.3f}{s['best_step_s']:>9.3f}"
                   f"{s['tokens_per_s']:>10.1f}{s['peak_mem_mb']:>10.0f}{s['mfu']:>8.1%}  {s['settings']}")
        for n in s["notes"]:
            click.echo(f"{p}     note: {n}")
        if side == "hf_compile":
            click.echo(f"{p}     compile (warm-up time beyond steady steps, per round, not timed): "
                       + ", ".join(f"{x:.1f} s" for x in s["warmup_extra_s"]))
    ff = sides["fastft"]
    click.echo(f"{p} MFU = model-FLOPs utilisation: {w['model_flops_per_token'] / 1e9:.4g} GFLOP/token for every "
               f"side (every position through the LM head) / best dense GEMM rate {w['gemm_flops_best'] / 1e9:.0f} "
               f"GFLOP/s; fastft executes {w['fastft_executed_flops_per_token'] / 1e9:.4g} GFLOP/token (head on "
               f"target positions only) = {ff['executed_flops_utilisation']:.1%} of that rate")
    for b, c in w["baselines"].items():
        tgt = "" if c["speed_target"] is None else (
            f"; target >= {c['speed_target']} {'met' if c['speed_target_met'] else 'NOT met'}")
        click.echo(f"{p} fastft vs {c['name']}: tokens/s x{c['tokens_per_s']:.2f} (per round "
                   f"{', '.join(f'{x:.2f}' for x in c['tokens_per_s_per_round'])}; fastest steps x{c['best_step']:.2f}"
                   f"{tgt}), peak memory x{c['peak_mem']:.2f} ({mem})")
    h = w["headline"]
    mt = "" if h["memory_target"] is None else (
        f" (target <= {h['memory_target']} {'met' if h['memory_target_met'] else 'NOT met'})")
    click.echo(f"{p} headline: fastft x{h['tokens_per_s']:.2f} tokens/s against the fastest baseline measured "
               f"({BASELINE_NAMES[h['speed_baseline']]}), peak memory x{h['peak_mem']:.2f} against the leanest "
               f"({BASELINE_NAMES[h['memory_baseline']]}){mt}")
    ps = w["process_settings"]
    if not ps["same_threads"]:
        click.echo(f"{p} note: the children ran with different thread counts: {ps['threads']}")
    click.echo(f"{p} malloc per side: " + ", ".join(f"{BASELINE_NAMES.get(s, 'fastft')} {'/'.join(v)}"
                                                  for s, v in ps["malloc"].items()))
    for side, s in sides.items():
        click.echo(f"{p} {BASELINE_NAMES.get(side, 'fastft')} loss: {' '.join(f'{x:.4f}' for x in s['losses'])}")
