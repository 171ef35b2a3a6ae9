"""Data pipeline benchmark: tokenisation cache and packing.

    python benchmarks/bench_data.py [--repeats 3]

1. ``build_datasets`` on the bundled instruction set repeated 40x with the SmolLM2 tokenizer: cold (cache off)
   vs warm (cache hit), alternating, medians; both must give identical examples (checked first).
2. Packing: share of padding in collated batches (batch 8, max_length 256) unpacked vs packed,
   and the forward+backward time per epoch of a small Llama (4 layers, hidden 256) on both,
   after checking the losses agree.

Writes ``benchmarks/results/data.csv`` and ``data.md`` with the machine and versions.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"


def _machine() -> str:
    import transformers

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {sys.version.split()[0]}, "
            f"threads {torch.get_num_threads()}")


def bench_cache(repeats: int, copies: int = 40) -> list[dict]:
    import json

    from fastft.config import load_config
    from fastft.data import build_datasets, default_train_file
    from fastft.models.loading import load_tokenizer, materialize

    tok = load_tokenizer(materialize("default"))
    tmp = Path(tempfile.mkdtemp(prefix="fastft-bench-data-"))
    os.environ["FASTFT_CACHE"] = str(tmp / "cache")  # after the model cache was used: data cache only
    rows = [json.loads(line) for line in open(default_train_file())]
    data = tmp / "instructions_x40.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * copies))
    warm_cfg = load_config(None, ["--data.train_file", str(data)]).data
    cold_cfg = load_config(None, ["--data.train_file", str(data), "--data.cache", "false"]).data
    ref = build_datasets(cold_cfg, tok)
    assert build_datasets(warm_cfg, tok).train == ref.train  # fills the cache
    assert build_datasets(warm_cfg, tok).train == ref.train  # reads it
    cold, warm = [], []
    for _ in range(repeats):  # alternate A/B: the machine is shared
        t = time.perf_counter()
        build_datasets(cold_cfg, tok)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        build_datasets(warm_cfg, tok)
        warm.append(time.perf_counter() - t)
    c, w = statistics.median(cold), statistics.median(warm)
    return [{"bench": f"build_datasets, bundled instructions x{copies} (SmolLM2 tokenizer)", "baseline_s": c,
             "fastft_s": w, "ratio": c / w,
             "note": f"seconds: tokenise (cache off) vs cache hit; {len(rows) * copies} rows"}]


def bench_packing(repeats: int) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastft.config import load_config
    from fastft.data import build_datasets
    from fastft.data.collate import Collator
    from fastft.data.packing import PackedCollator, pack_examples
    from fastft.models.loading import load_tokenizer, materialize

    tok = load_tokenizer(materialize("default"))
    examples = build_datasets(load_config(None, ["--data.val_ratio", "0"]).data, tok).train[:128]
    packed = pack_examples(examples, 256)
    bs = 8
    plain, pc = Collator(tok.pad_token_id), PackedCollator(tok.pad_token_id)
    ub = [plain(examples[i:i + bs]) for i in range(0, len(examples), bs)]
    pb = [pc(packed[i:i + 1]) for i in range(len(packed))]  # one 256-token row holds ~6 samples
    real = sum(len(e["input_ids"]) for e in examples)
    pad_u = 1 - real / sum(b["input_ids"].numel() for b in ub)
    pad_p = 1 - real / sum(b["input_ids"].numel() for b in pb)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="sdpa"))

    def epoch(batches) -> tuple[float, float]:
        t = time.perf_counter()
        loss_sum, n = 0.0, 0
        for b in batches:
            out = model(**b)
            k = int((b["labels"][:, 1:] != -100).sum())
            (out.loss * k).backward()
            loss_sum, n = loss_sum + out.loss.item() * k, n + k
        model.zero_grad()
        return time.perf_counter() - t, loss_sum / n

    lu, lp = epoch(ub)[1], epoch(pb)[1]
    assert abs(lu - lp) < 1e-3 * abs(lu), (lu, lp)  # correctness before timing
    tu, tp = [], []
    for _ in range(repeats):
        tu.append(epoch(ub)[0])
        tp.append(epoch(pb)[0])
    u, p = statistics.median(tu), statistics.median(tp)
    return [{"bench": "padding share, 128 bundled examples, batch 8 vs packed 256-token rows", "baseline_s": pad_u,
             "fastft_s": pad_p, "ratio": float("nan"), "note": "fractions of padding tokens, not seconds"},
            {"bench": "fwd+bwd epoch, Llama 4x256 (vocab 49152), unpacked vs packed", "baseline_s": u, "fastft_s": p,
             "ratio": u / p, "note": f"loss {lu:.4f} vs {lp:.4f}; {len(ub)} padded batches vs {len(pb)} packed rows"}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = bench_cache(args.repeats) + bench_packing(args.repeats)
    OUT.mkdir(parents=True, exist_ok=True)
    header = "bench,baseline,fastft,ratio,note"
    lines = [header] + [f"\"{r['bench']}\",{r['baseline_s']:.4f},{r['fastft_s']:.4f},{r['ratio']:.2f},\"{r['note']}\""
                        for r in rows]
    (OUT / "data.csv").write_text("\n".join(lines) + "\n")
    md = [f"# data pipeline benchmark\n\n{_machine()}\n", "| bench | baseline | fastft | ratio | note |",
          "|---|---|---|---|---|"]
    md += [f"| {r['bench']} | {r['baseline_s']:.4f} | {r['fastft_s']:.4f} | {r['ratio']:.2f}x | {r['note']} |"
           for r in rows]
    (OUT / "data.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
