"""Per-trial overhead of ``fastft search`` (model loaded once) vs ``fastft train`` per trial.

    python benchmarks/bench_search.py [--config examples/search_lora.yaml]
        [--space examples/space_lora.yaml] [--trials 4] [--rounds 1] [--threads 2] [--tiny]

Overhead = time not spent in train or eval steps (``Trainer.train_step`` and
``Trainer.evaluate``, timed inside each process by wrapping them): interpreter start-up, imports,
model load, data, LoRA/optimizer set-up, writing outputs.

* **search**: one ``fastft.search.run`` process running ``--trials`` trials (random sampler,
  no pruning, so every trial runs its full budget): overhead per trial = (process wall time -
  time in steps) / trials, the one-time load included.
* **train per trial**: one ``fastft train`` process per trial, with the config the search
  wrote for that trial (``<out>/trials/<n>/config.yaml``): overhead = wall - time in steps, mean.

Correctness first: each ``fastft train`` run must end with the same held-out loss as its search
trial (the reuse path changes nothing; tolerance 1e-5 relative), else nothing is reported.
Sides alternate per round (the machine is shared). Writes ``benchmarks/results/search.csv`` and
``search.md`` with the machine and versions. Target (issue 23): search overhead <= 5 % of the
trial time on the default example. ``--tiny`` runs on a random 2-layer Llama (verifies the
script in seconds; its figures mean nothing).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"

# Runs in each child: wrap the trainer's step and evaluation with timers, run the command, and
# print the time spent inside them as the last line (JSON).
CHILD = r"""
import json, sys, time
del sys.path[0]  # not the caller's folder: a top-level kernels/ would shadow HF's kernels
from fastft.train.trainer import Trainer
spent = {"steps": 0.0}
def timed(fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent["steps"] += time.perf_counter() - t
    return wrapper
Trainer.train_step = timed(Trainer.train_step)
Trainer.evaluate = timed(Trainer.evaluate)
args = json.loads(sys.argv[1])
try:
    if args["kind"] == "search":
        from fastft.search import run
        run(args["config"], args["space"], sampler="random", trials=args["trials"], out=args["out"], seed=0,
            pruner="none", plots=False, overrides=args["overrides"], log=lambda s: print(s, file=sys.stderr))
    else:
        from fastft.cli import main
        main(["train", args["config"], *args["overrides"]])
finally:
    print(json.dumps(spent))
"""


def _machine() -> str:
    import torch
    import transformers

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {sys.version.split()[0]}")


def child(args: dict, threads: int) -> tuple[float, float]:
    """(wall seconds, seconds inside train/eval steps) of one child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{args['kind']} failed:\n{p.stderr[-3000:]}")
    return wall, json.loads(p.stdout.strip().splitlines()[-1])["steps"]


def final_loss(run_dir: Path) -> float:
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    return [r for r in rows if r["event"] == "eval"][-1]["eval_loss"]


def tiny_setup(tmp: Path) -> tuple[str, list[str]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_helpers import make_tiny_model

    model = make_tiny_model(tmp / "tiny")
    return "", ["--model.path", str(model), "--model.dtype", "fp32", "--train.max_steps", "4",
                "--train.eval_every", "2", "--train.batch_size", "4", "--data.max_length", "64"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "search_lora.yaml"))
    ap.add_argument("--space", default=str(ROOT / "examples" / "space_lora.yaml"))
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tiny", action="store_true", help="random 2-layer Llama: checks the script, not a figure")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fastft-bench-search-"))
    if a.tiny:  # the tiny model's tokenised data must not land in the user's cache
        os.environ.setdefault("FASTFT_CACHE", str(tmp / "cache"))
    config, extra = tiny_setup(tmp) if a.tiny else (a.config, [])
    common = [*extra, "--train.threads", str(a.threads), "--train.progress", "false",
              "--output.tensorboard", "false"]
    rows = []
    for rnd in range(a.rounds):
        out = tmp / f"search{rnd}"
        s_wall, s_steps = child({"kind": "search", "config": config or None, "space": a.space,
                                 "trials": a.trials, "out": str(out), "overrides": common}, a.threads)
        import optuna
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        study = optuna.load_study(study_name="search",
                                  storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
        t_walls, t_over = [], []
        for t in study.trials:
            run_dir = tmp / f"train{rnd}-{t.number}"
            wall, steps = child({"kind": "train", "config": str(out / "trials" / f"{t.number:04d}" / "config.yaml"),
                                 "overrides": [*common, "--output.dir", str(run_dir)]}, a.threads)
            got = final_loss(run_dir)
            if t.value is None or abs(got - t.value) > 1e-5 * max(1.0, abs(t.value)):
                raise SystemExit(f"trial {t.number}: fastft train gives eval_loss {got}, the search {t.value}: "
                                 "the reuse path changed the result; not timing it")
            t_walls.append(wall)
            t_over.append(wall - steps)
        n = len(study.trials)
        s_over = (s_wall - s_steps) / n
        rows.append({"round": rnd, "trials": n, "search_wall_s": s_wall, "search_overhead_per_trial_s": s_over,
                     "search_overhead_pct": 100 * s_over / (s_wall / n),
                     "train_wall_per_trial_s": statistics.mean(t_walls),
                     "train_overhead_per_trial_s": statistics.mean(t_over),
                     "train_overhead_pct": 100 * statistics.mean(t_over) / statistics.mean(t_walls)})
        print(json.dumps(rows[-1]))
    if a.tiny:
        print(f"--tiny: checked; nothing written (files in {tmp})")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    (OUT / "search.csv").write_text(",".join(keys) + "\n" + "".join(
        ",".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n" for r in rows))
    med = {k: statistics.median(r[k] for r in rows) for k in keys if k != "round"}
    (OUT / "search.md").write_text(
        f"# fastft search: per-trial overhead ({time.strftime('%Y-%m-%d %H:%M')})\n\n{_machine()}, "
        f"threads {a.threads}; {a.config} + {a.space}, {a.trials} trials x {a.rounds} rounds (medians)\n\n"
        "| | overhead per trial (s) | share of trial time |\n|---|---|---|\n"
        f"| fastft search (load once) | {med['search_overhead_per_trial_s']:.2f} | "
        f"{med['search_overhead_pct']:.1f} % |\n"
        f"| fastft train per trial | {med['train_overhead_per_trial_s']:.2f} | {med['train_overhead_pct']:.1f} % |\n")
    print((OUT / "search.md").read_text())


if __name__ == "__main__":
    main()
