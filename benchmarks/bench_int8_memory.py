"""Peak RSS of a LoRA run with ``lora.int8_base=true`` vs the same run with a bf16 base.

Each run is its own ``fastft train`` process, alternating bf16 / int8 for ``--rounds`` rounds;
both check that training worked (finite losses, a final adapter) before their memory counts. The
figure compared is the whole process's peak RSS: the child's ``ru_maxrss`` as ``wait4`` reports
it, which includes what happens after training (the final save, the curves plot). The trainer's
own ``peak_rss_mb`` (``ru_maxrss`` when its loop ends) is kept alongside as ``*_train_mb``. Default: the default LoRA run (SmolLM2-135M, bundled data, batch 8x256) with a bf16 base,
``--steps`` optimizer steps. Prints each round, the medians and the ratio (target <= 0.8, issue 19),
and appends a row to ``benchmarks/results/int8_memory.csv`` with the machine and versions.

Usage: ``python benchmarks/bench_int8_memory.py [--steps 5] [--rounds 3] [-- extra fastft train args]``
(e.g. ``-- --train.batch_size 4 --data.max_length 128``).
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
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_run(int8: bool, steps: int, extra: list[str], workdir: Path) -> dict:
    run_dir = workdir / f"{'int8' if int8 else 'bf16'}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "fastft.cli", "train", "--model.dtype", "bf16", "--lora.int8_base", str(int8).lower(),
           "--train.max_steps", str(steps), "--train.progress", "false", "--output.tensorboard", "false",
           "--output.dir", str(run_dir), *extra]
    env = {**os.environ, "FASTFT_HUGEPAGES": os.environ.get("FASTFT_HUGEPAGES", "1")}
    err_path = workdir / f"{run_dir.name}.stderr"
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=workdir)
        # wait4, not wait: its rusage is this child's own (fastft re-executes itself in place, so
        # the pid is the same process throughout); ru_maxrss is in KiB on Linux
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{'int8' if int8 else 'bf16'} run failed ({p.returncode}): {err_path.read_text().strip()[-800:]}")
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("event") == "train"]
    end = [r for r in recs if r.get("event") == "end"][-1]
    ok = len(losses) == steps and all(l == l and abs(l) < 1e4 for l in losses) and (run_dir / "final" / "adapter").is_dir()
    if not ok:
        raise SystemExit(f"{run_dir}: the run did not train correctly (losses {losses})")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "train_peak_mb": end["peak_rss_mb"], "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--note", default="", help="free text for the csv row (e.g. which commit was measured)")
    ap.add_argument("extra", nargs="*", help="extra fastft train arguments (after --)")
    a = ap.parse_args()
    rows = {"bf16": [], "int8": []}
    train = {"bf16": [], "int8": []}
    with tempfile.TemporaryDirectory(prefix="fastft-int8-mem-") as tmp:
        for r in range(a.rounds):
            for name in ("bf16", "int8"):  # alternating: a drift in the machine hits both sides
                res = one_run(name == "int8", a.steps, a.extra, Path(tmp))
                rows[name].append(res["peak_rss_mb"])
                train[name].append(res["train_peak_mb"])
                print(f"round {r + 1} {name}: peak RSS {res['peak_rss_mb']:.0f} MB "
                      f"(at the end of the training loop {res['train_peak_mb']:.0f} MB), "
                      f"losses {' '.join(f'{x:.3f}' for x in res['losses'])}", flush=True)
    b, i = statistics.median(rows["bf16"]), statistics.median(rows["int8"])
    ratio = statistics.median([y / x for x, y in zip(rows["bf16"], rows["int8"])])
    print(f"median peak RSS: bf16 {b:.0f} MB, int8 {i:.0f} MB; int8/bf16 x{ratio:.3f} "
          f"(median of per-round ratios; target <= 0.8)")
    import torch
    import transformers

    out = HERE / "results" / "int8_memory.csv"
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": a.steps, "rounds": a.rounds,
           "extra": " ".join(a.extra), "bf16_peak_mb": round(b), "int8_peak_mb": round(i), "ratio": round(ratio, 3),
           "bf16_runs": " ".join(f"{x:.0f}" for x in rows["bf16"]), "int8_runs": " ".join(f"{x:.0f}" for x in rows["int8"]),
           "bf16_train_mb": round(statistics.median(train["bf16"])), "int8_train_mb": round(statistics.median(train["int8"])),
           "measure": "wait4 ru_maxrss", "note": a.note, "hugepages": os.environ.get("FASTFT_HUGEPAGES", "1"),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    old = []
    if out.is_file():
        with open(out, newline="") as f:
            old = list(csv.DictReader(f))
    for r in old:
        r["measure"] = r.get("measure") or "trainer end-of-loop ru_maxrss"
    fields = list(row) + [k for r in old for k in r if k not in row]
    # older rows lack the newer columns (blank there: e.g. rows before "measure" used the
    # trainer's end-of-loop figure); rewritten whole so the header always names every column
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(fields)), restval="")
        w.writeheader()
        w.writerows([*old, row])
    print(f"appended {out}")


if __name__ == "__main__":
    main()
