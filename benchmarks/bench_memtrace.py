"""Where a `fastft bench` side's peak RSS comes from: RSS per phase and the bytes of live tensors.

Runs one side of a bench run again from the spec file the bench wrote (``<out>/<workload>-<side>-<round>.spec.json``),
in this process, with a thread sampling ``/proc/self/status`` every 3 ms (anonymous and file-backed
RSS separately: file pages of memory-mapped safetensors count in ``ru_maxrss`` too) and marks at the
phases of a fastft step (model built, optimizer built, before/after every optimizer step), where it
also sums the storages of every live tensor (``gc``). RSS well above the live tensors is memory the
allocator keeps (freed grads and activations), not data.

    fastft bench --mode full --workload instruction --rounds 1 --steps 2 --out runs/mem
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/bench_memtrace.py runs/mem/instruction-fastft-0.spec.json

(the bench's fastft child runs with that tunable by default, see ``--malloc``; the HF side's spec
works too, with marks only at start and end.) Extra arguments are fastft config overrides, e.g.
``model.dtype=bf16`` on a CPU without bf16 units, where fastft would otherwise pick fp32.
"""
from __future__ import annotations

import gc
import json
import sys
import threading
import time
import warnings

import torch

PEAK = {"rss": 0.0, "anon": 0.0, "file": 0.0}


def status() -> dict[str, float]:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out


def sampler(stop: threading.Event) -> None:
    while not stop.is_set():
        s = status()
        PEAK["rss"] = max(PEAK["rss"], s["VmRSS"])
        PEAK["anon"] = max(PEAK["anon"], s["RssAnon"])
        PEAK["file"] = max(PEAK["file"], s["RssFile"])
        time.sleep(0.003)


def live_tensor_mb() -> float:
    """Bytes of the distinct storages of every tensor the garbage collector can see (mapped file
    storages included, resident or not)."""
    seen = {}
    with warnings.catch_warnings():  # isinstance() on some lazy module proxies warns
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                    st = o.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, ReferenceError):
                continue
    return sum(seen.values()) / 2 ** 20


def mark(name: str, tensors: bool = True) -> None:
    s = status()
    live = f" live tensors {live_tensor_mb():7.0f}" if tensors else ""
    print(f"{name:<20} rss {s['VmRSS']:7.0f} (anon {s['RssAnon']:7.0f} file {s['RssFile']:6.0f}) | peak rss "
          f"{PEAK['rss']:7.0f} (anon {PEAK['anon']:7.0f} file {PEAK['file']:6.0f}){live}", flush=True)


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[0]).read())
    spec["fastft_overrides"] = list(spec.get("fastft_overrides", [])) + argv[1:]
    spec["run_dir"] = spec["run_dir"] + "-memtrace"
    import fastft.bench.runners as br
    import fastft.optim as fo
    import fastft.train.cli as tc

    build, init, step = tc.build, fo.FusedAdamW.__init__, fo.FusedAdamW.step

    def traced_build(*a, **k):
        mark("before build")
        r = build(*a, **k)
        mark("after build")
        return r

    def traced_init(self, *a, **k):
        init(self, *a, **k)
        mark("optimizer built")

    def traced_step(self, *a, **k):
        mark("before opt.step")
        r = step(self, *a, **k)
        mark("after opt.step")
        return r

    tc.build, fo.FusedAdamW.__init__, fo.FusedAdamW.step = traced_build, traced_init, traced_step
    stop = threading.Event()
    threading.Thread(target=sampler, args=(stop,), daemon=True).start()
    mark("start")
    out = br.run_hf(spec) if spec["side"] in br.HF_SIDES else br.run_fastft(spec)
    mark("end")
    stop.set()
    print(f"ru_maxrss {br.peak_rss_mb():.0f} MB; losses {' '.join(f'{x:.4f}' for x in out['losses'])}; "
          f"step times {' '.join(f'{t:.2f}' for t in out['step_times'])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
