"""Benchmark: packed vs unpacked training on fastft's fast path (target tokens per second).

    python benchmarks/bench_packing.py step  [--rows 4] [--seq 256] [--rounds 10] [--hf] [-- fastft overrides]
    python benchmarks/bench_packing.py epoch [--rounds 1] [--batch 8] [--packed-batch 8] [-- fastft overrides]

The code is fastft/bench/packing.py (also behind ``fastft bench --packing``); results append to
benchmarks/results/packing.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastft.bench.packing import main  # noqa: E402

if __name__ == "__main__":
    main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
