"""What ``fastft bench`` computes from the children's records: per-side summaries, FLOPs and MFU,
ratios against each baseline, loss agreement, targets, the plot and the history CSV.

Pure functions of the records (no torch, no subprocesses), so they are unit-tested directly.
"""
from __future__ import annotations

import csv
import statistics
from pathlib import Path

# Loss agreement (relative, per step). Both sides start from the same weights and see the same
# batches with the same constant lr, so the first loss differs only by bf16 rounding (HF: fp32
# masters under bf16 autocast, fastft: bf16 weights), and later losses drift apart only as much as
# that rounding (and a different LoRA-A draw) moves the trajectory. Measured on SmolLM2-135M LoRA:
# see benchmarks/README.md. A 10x lr on one side moves the curve by far more.
LOSS_RTOL_FIRST = 0.01  # step 1: same weights, same batch, only bf16 rounding differs
LOSS_RTOL = 0.03        # every step

BASELINE_NAMES = {"hf": "HF eager", "hf_compile": "HF + torch.compile", "hf_liger": "HF + Liger"}

# (device, mode, workload, baseline) -> minimum tokens/s ratio; (device, mode) -> maximum memory ratio.
# CPU: issue 21's targets; CUDA: issue 17's (Llama-3.2-1B shapes, 8x1024, one H100).
SPEED_TARGETS = {
    ("cpu", "lora", "instruction", "hf"): 2.5, ("cpu", "lora", "instruction", "hf_compile"): 2.0,
    ("cpu", "lora", "text", "hf"): 2.0, ("cpu", "lora", "text", "hf_compile"): 1.7,
    ("cpu", "full", "instruction", "hf"): 1.8, ("cpu", "full", "instruction", "hf_compile"): 1.5,
    ("cpu", "full", "text", "hf"): 1.8, ("cpu", "full", "text", "hf_compile"): 1.5,
    ("cpu", "int8", "instruction", "hf"): 2.0, ("cpu", "int8", "text", "hf"): 2.0,
    ("cuda", "lora", "instruction", "hf"): 1.5, ("cuda", "lora", "text", "hf"): 1.5,
    ("cuda", "lora", "instruction", "hf_liger"): 1.0, ("cuda", "lora", "text", "hf_liger"): 1.0,
    ("cuda", "full", "instruction", "hf"): 1.3, ("cuda", "full", "text", "hf"): 1.3,
}
MEMORY_TARGETS = {("cpu", "lora"): 0.6, ("cpu", "int8"): 0.6, ("cpu", "full"): 0.7, ("cuda", "lora"): 0.6}


def loss_check(hf: list[float], ff: list[float], rtol_first: float = LOSS_RTOL_FIRST,
               rtol: float = LOSS_RTOL) -> tuple[bool, str]:
    """Per-step relative agreement of two loss curves of the same length."""
    if len(hf) != len(ff) or not hf:
        return False, f"loss curves have {len(hf)} (HF) and {len(ff)} (fastft) points"
    rel = [abs(a - b) / max(abs(a), 1e-6) for a, b in zip(hf, ff)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    ok = rel[0] <= rtol_first and max(rel) <= rtol
    return ok, (f"first-step rel diff {rel[0]:.4f} (tol {rtol_first}), max rel diff {rel[worst]:.4f} at step "
                f"{worst + 1} (tol {rtol}): HF {hf[worst]:.4f} vs fastft {ff[worst]:.4f}")


def model_flops_per_token(cfg, seq: int, mode: str) -> float:
    """Training FLOPs per token of a decoder, the standard model-FLOPs count: 2 per weight MAC
    forward, 2 more for the input gradient, 2 more for the weight gradient of trained weights (not
    in LoRA: the frozen base needs none), plus attention scores and values (4*L*d*seq forward, x3
    with backward). lm_head is counted over every position, as the model defines it."""
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


def head_flops_per_token(cfg, mode: str) -> float:
    """The lm_head's share of :func:`model_flops_per_token` (per position it runs on)."""
    return (6 if mode == "full" else 4) * cfg.hidden_size * cfg.vocab_size


def executed_flops_per_token(cfg, seq: int, mode: str, target_fraction: float) -> float:
    """FLOPs fastft executes per token: its loss runs the lm_head only on positions that carry a
    target (``fastft.train.utils.CausalLMLoss``), so the head's share shrinks to that fraction."""
    return model_flops_per_token(cfg, seq, mode) - (1.0 - target_fraction) * head_flops_per_token(cfg, mode)


def summarise(runs: list[dict], warmup: int) -> dict:
    """One side over its rounds: medians of the timed steps, memory, losses of round 1."""
    steady = [t for r in runs for t in r["step_times"][warmup:]]
    toks = [k for r in runs for k in r["tokens"][warmup:]]
    med = statistics.median(steady)
    tps = statistics.median([k / t for k, t in zip(toks, steady)])
    # time spent in the untimed warm-up beyond steady steps: for HF + torch.compile, the compile
    warm_extra = [sum(r["step_times"][:warmup]) - warmup * statistics.median(r["step_times"][warmup:]) for r in runs]
    return {"median_step_s": med, "tokens_per_s": tps, "best_step_s": min(steady),
            "peak_mem_mb": statistics.median([r["peak_mem_mb"] for r in runs]),
            "peak_mem_mb_runs": [r["peak_mem_mb"] for r in runs], "memory_measure": runs[0]["memory_measure"],
            "step_times": steady, "warmup_step_times": [r["step_times"][:warmup] for r in runs],
            "warmup_extra_s": warm_extra, "losses": runs[0]["losses"], "losses_all_rounds": [r["losses"] for r in runs],
            "settings": runs[0]["settings"], "settings_all_rounds": [r["settings"] for r in runs],
            "notes": runs[0]["notes"], "threads": runs[0]["threads"]}


def per_round_ratios(base_runs: list[dict], ff_runs: list[dict], warmup: int) -> list[float]:
    """fastft's speed over a baseline's, per round (the load changes between rounds: pair runs of
    one round, never pool across rounds). Ratio of median step times = ratio of tokens/s."""
    return [statistics.median(b["step_times"][warmup:]) / statistics.median(f["step_times"][warmup:])
            for b, f in zip(base_runs, ff_runs)]


def compare(device: str, mode: str, workload: str, sides: dict, runs: dict, warmup: int) -> dict:
    """Ratios of fastft against every baseline measured, and the headline: against the fastest
    baseline (highest median tokens/s) for speed and the leanest (lowest peak memory) for memory."""
    ff = sides["fastft"]
    out = {}
    for b in (k for k in sides if k != "fastft"):
        pr = per_round_ratios(runs[b], runs["fastft"], warmup)
        speed = statistics.median(pr)
        mem = ff["peak_mem_mb"] / sides[b]["peak_mem_mb"]
        ok, msg = loss_check(sides[b]["losses"], ff["losses"])
        tgt = SPEED_TARGETS.get((device, mode, workload, b))
        out[b] = {"name": BASELINE_NAMES[b], "tokens_per_s": speed, "tokens_per_s_per_round": pr,
                  "best_step": sides[b]["best_step_s"] / ff["best_step_s"],
                  "peak_mem": mem, "loss_check": {"ok": ok, "detail": msg},
                  "speed_target": tgt, "speed_target_met": None if tgt is None else speed >= tgt}
    fastest = max(out, key=lambda b: sides[b]["tokens_per_s"])
    leanest = min(out, key=lambda b: sides[b]["peak_mem_mb"])
    mem_tgt = MEMORY_TARGETS.get((device, mode))
    headline = {"speed_baseline": fastest, "tokens_per_s": out[fastest]["tokens_per_s"],
                "memory_baseline": leanest, "peak_mem": out[leanest]["peak_mem"], "memory_target": mem_tgt,
                "memory_target_met": None if mem_tgt is None else out[leanest]["peak_mem"] <= mem_tgt}
    return {"baselines": out, "headline": headline, "loss_ok": all(v["loss_check"]["ok"] for v in out.values())}


def plot(res: dict, workload: str, path: Path) -> str:
    """Write the workload's plot; returns a line to print (a missing matplotlib is one line, never
    an error: the results are already written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (results are in results.json)"
    w = res["workloads"][workload]
    names = list(w["sides"])
    labels = [BASELINE_NAMES.get(n, "fastft") for n in names]
    colors = ["#d9534f" if n == "fastft" else "#888888" for n in names]
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ax[0].bar(labels, [w["sides"][n]["tokens_per_s"] for n in names], color=colors)
    ax[0].set_title(f"tokens/s (x{w['headline']['tokens_per_s']:.2f} vs {BASELINE_NAMES[w['headline']['speed_baseline']]})",
                    fontsize=9)
    ax[1].bar(labels, [w["sides"][n]["peak_mem_mb"] / 1024 for n in names], color=colors)
    ax[1].set_title(f"peak memory GB, {w['sides']['fastft']['memory_measure']} (x{w['headline']['peak_mem']:.2f})",
                    fontsize=9)
    for n, lab in zip(names, labels):
        losses = w["sides"][n]["losses"]
        ax[2].plot(range(1, len(losses) + 1), losses, "s--" if n == "fastft" else "o-", label=lab)
    ax[2].set_title("training loss: " + ("agree" if w["loss_ok"] else "DISAGREE"))
    ax[2].set_xlabel("step")
    ax[2].legend(fontsize=8)
    for a in ax[:2]:
        a.tick_params(axis="x", labelsize=7)
    a = res["args"]
    fig.suptitle(f"{workload} ({w['data']['target_fraction']:.0%} targets), {a['mode']} {Path(a['model']).name} "
                 f"batch {a['batch']}x{a['seq']} on {a['device']} ({res['machine'].get('device_name', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


def history_rows(res: dict) -> list[dict]:
    """One CSV row per workload and baseline."""
    a = res["args"]
    rows = []
    for wname, w in res["workloads"].items():
        ff = w["sides"]["fastft"]
        for b, c in w["baselines"].items():
            s = w["sides"][b]
            rows.append({"time": res["time"], "device": a["device"], "mode": a["mode"], "workload": wname,
                         "target_fraction": round(w["data"]["target_fraction"], 3), "baseline": b,
                         "headline": b == w["headline"]["speed_baseline"], "model": a["model"], "batch": a["batch"],
                         "seq": a["seq"], "steps": a["steps"], "rounds": a["rounds"], "malloc": a["malloc"],
                         "hf_tok_s": round(s["tokens_per_s"], 2), "fastft_tok_s": round(ff["tokens_per_s"], 2),
                         "speedup": round(c["tokens_per_s"], 3),
                         "speedup_rounds": " ".join(f"{x:.3f}" for x in c["tokens_per_s_per_round"]),
                         "hf_mem_mb": round(s["peak_mem_mb"]), "fastft_mem_mb": round(ff["peak_mem_mb"]),
                         "mem_ratio": round(c["peak_mem"], 3), "memory_measure": ff["memory_measure"],
                         "fastft_mfu": round(ff["mfu"], 4), "hf_mfu": round(s["mfu"], 4),
                         "loss_ok": c["loss_check"]["ok"], "load_avg": round(res["machine"]["load_avg"][0], 2),
                         "torch": res["machine"]["torch"], "transformers": res["machine"]["transformers"]})
    return rows


def append_history(path: Path, rows: list[dict]) -> None:
    """Append ``rows``; a file written by an older bench (other columns) is rewritten with the
    union of the columns, old rows kept with blanks for the new ones."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    old: list[dict] = []
    if path.is_file():
        with open(path, newline="") as f:
            r = csv.DictReader(f)
            old_fields = list(r.fieldnames or [])
            old = list(r)
        if old_fields != fields:
            fields = old_fields + [k for k in fields if k not in old_fields]
        else:
            old = []  # same columns: plain append below
    mode = "w" if old or not path.is_file() else "a"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if mode == "w":
            w.writeheader()
            w.writerows(old)
        w.writerows(rows)
