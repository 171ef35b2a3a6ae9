"""Where a LoRA run's resident memory goes: RSS (anonymous / file-backed) at each phase of one
``fastft train`` process, for the bf16 base and the int8 base (``lora.int8_base``).

The breakdown behind benchmarks/bench_int8_memory.py's ratio: imports, the model's weights, the
tokenizer, the training steps, the end of the run. Each mode runs in its own process (RSS is per
process), bf16 first, then int8; in each, a thread samples ``/proc/self/status`` every 2 ms and
wrappers around the loader, ``Recipe.adapt``/``data`` and ``Trainer.train_step`` mark the
phases. The largest file mappings at the end are listed too (a bf16 base is the mmap'd
safetensors file; an int8 base is heap). tracemalloc would not see torch's tensors.

Usage: ``python benchmarks/rss_phases.py [-- fastft train args]``, e.g.
``python benchmarks/rss_phases.py -- --train.max_steps 2 --train.batch_size 2 --data.max_length 64``.
Runs with ``FASTFT_HUGEPAGES`` as ``fastft`` would (glibc's huge-page tunable on unless ``=0``).
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, MB."""
    out = {}
    with open("/proc/self/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) // 1024
    return out


def largest_mappings(n: int = 6) -> list[tuple[str, int]]:
    """The ``n`` mappings (by file, or [heap]/[anon]) with the most resident MB."""
    rss: collections.Counter = collections.Counter()
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for ln in f:
            parts = ln.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts and parts[0] == "Rss:":
                rss[name] += int(parts[1])
    return [(k, v // 1024) for k, v in rss.most_common(n)]


def child(mode: str, extra: list[str], out_dir: str) -> None:
    marks: list[tuple[str, dict]] = []
    peak = {"mb": 0, "phase": "start"}
    cur = ["start"]

    def mark(name: str) -> None:
        cur[0] = name
        marks.append((name, status()))

    def sampler() -> None:
        while True:
            v = status()["VmRSS"]
            if v > peak["mb"]:
                peak.update(mb=v, phase=cur[0])
            time.sleep(0.002)

    mark("python")
    threading.Thread(target=sampler, daemon=True).start()
    import torch  # noqa: F401

    mark("import torch")
    import fastft.models.loading as loading
    import fastft.train.recipe as recipe
    import fastft.train.trainer as trainer

    mark("import fastft.train")

    def wrap(owner, attr: str, name: str) -> None:
        f = getattr(owner, attr)

        def g(*a, **k):
            r = f(*a, **k)
            mark(name)
            return r
        setattr(owner, attr, g)

    wrap(loading, "load_model_and_tokenizer", "model + tokenizer loaded")
    wrap(recipe.Recipe, "adapt", "LoRA adapted")
    step = trainer.Trainer.train_step
    n = [0]

    def train_step(self):
        r = step(self)
        n[0] += 1
        mark(f"after step {n[0]}")
        return r
    trainer.Trainer.train_step = train_step
    from fastft.train.cli import run

    with contextlib.redirect_stdout(io.StringIO()):  # the run's own report: not part of this table
        run(None, ["--model.dtype", "bf16", "--lora.int8_base", str(mode == "int8").lower(), "--train.progress", "false",
                   "--output.tensorboard", "false", "--output.dir", os.path.join(out_dir, mode), *extra])
    mark("end (saved, plotted)")
    print(f"== {mode}: phase, RSS MB (anonymous + file-backed), process peak so far")
    for name, s in marks:
        print(f"  {name:<26}{s['VmRSS']:>6} ({s['RssAnon']:>4} + {s['RssFile']:>4})   peak {s['VmHWM']:>5}")
    print(f"  highest sample {peak['mb']} MB, reached during: {peak['phase']!r} and what follows it")
    print("  largest mappings at the end: " + ", ".join(f"{os.path.basename(k)} {v}" for k, v in largest_mappings()))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[4:], sys.argv[3])
    extra = sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:]
    env = dict(os.environ)
    if env.get("FASTFT_HUGEPAGES", "1") != "0" and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", ""):
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"  # what the fastft command re-executes itself with
    with tempfile.TemporaryDirectory(prefix="fastft-rss-phases-") as tmp:
        for mode in ("bf16", "int8"):
            # -P: the repository root is not put on sys.path (its kernels/ folder would shadow HF's)
            subprocess.run([sys.executable, "-P", __file__, "--child", mode, tmp, *extra], env=env, check=True,
                           stderr=subprocess.DEVNULL, cwd=tmp)


if __name__ == "__main__":
    main()
