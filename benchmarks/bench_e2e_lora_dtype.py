"""A/B: fp32 LoRA A/B under bf16 autocast vs bf16 LoRA A/B without autocast (forward+backward only).

SmolLM2-135M (packaged GGUF) with bf16 frozen weights, PEFT LoRA r=16 on q_proj/v_proj, batch 4x256,
alternating A/B for 4 rounds after one warm-up each; prints medians and the ratio.
Usage: ``python benchmarks/bench_e2e_lora_dtype.py``. The optimizer step is excluded: the bf16
variant needs fp32 master weights in the optimizer (FusedAdamW(master_weights=True)) to train well.
"""
import sys, time, statistics, torch
sys.path.insert(0, __import__("os").path.dirname(__file__))
from bench_e2e_profile import load_model
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
m = get_peft_model(load_model(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj","v_proj"]))
ps = [p for p in m.parameters() if p.requires_grad]
ids = torch.randint(0, m.config.vocab_size, (4, 256))
def step(ac):
    t = time.perf_counter()
    if ac:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l = m(input_ids=ids, labels=ids).loss
    else:
        l = m(input_ids=ids, labels=ids).loss
    l.backward()
    for p in ps: p.grad = None
    return time.perf_counter() - t
A, B = [], []
for p in ps: p.data = p.data.float()
step(True)
for p in ps: p.data = p.data.bfloat16()
step(False)
for r in range(4):
    for p in ps: p.data = p.data.float()
    A.append(step(True))
    for p in ps: p.data = p.data.bfloat16()
    B.append(step(False))
a, b = statistics.median(A), statistics.median(B)
print(f"fp32 LoRA + autocast: {a:.3f} s; bf16 LoRA no autocast: {b:.3f} s; ratio {a/b:.3f}")
