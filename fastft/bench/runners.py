"""The sides of ``fastft bench``, each run in its own process.

``python -m fastft.bench.runners SPEC.json OUT.json`` reads a spec written by ``fastft.bench.cli``
(side, device, model folder, mode, batch, steps, lr, seed, the path of the shared tokenised rows)
and writes per-step wall times, losses, token counts, peak memory and the process settings it ran
with (malloc pages, threads).

* ``hf`` / ``hf_compile`` / ``hf_liger``: stock Hugging Face ``Trainer`` (+ PEFT for LoRA,
  bitsandbytes for int8 when it is installed) with its best stock settings for the device: bf16
  autocast (``bf16=True``) when the device has bf16 units, ``optim="adamw_torch_fused"``, SDPA
  attention, sequential sampling of rows that the parent already put in fastft's epoch order;
  ``hf_compile`` adds ``torch_compile=True``, ``hf_liger`` ``use_liger_kernel=True`` (CUDA).
* ``fastft``: ``fastft.train.cli.build`` + ``fastft.train.trainer.Trainer`` with a ``Config``, i.e. the
  code path of ``fastft train``, fed the same rows.

Step time on every side is the wall time between consecutive optimizer-step ends (data, forward,
backward, optimizer and the trainer's own per-step logging all included), after a
``torch.cuda.synchronize()`` on CUDA. Peak memory: the process's ``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated()`` on CUDA.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "v_proj"]
LORA_R, LORA_ALPHA = 16, 32.0
HF_SIDES = ("hf", "hf_compile", "hf_liger")


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mem_mb(device: str) -> float:
    """The side's peak memory: ``ru_maxrss`` on CPU, the CUDA caching allocator's high-water mark
    of allocated bytes on CUDA (what the tensors needed, not what the allocator reserved)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return peak_rss_mb()


def gemm_rates(device: str = "cpu", budget_s: float = 1.0) -> dict[str, float]:
    """Median dense GEMM rates (FLOP/s) on ``device`` now: ``bf16`` and, on CPU, ``fp32``.

    CUDA: an 8192^3 bf16 matmul, CUDA-synchronised. CPU: n x n x n with n = 2048, made smaller
    when one product would take over ``budget_s / 5`` (a CPU without bf16 units runs bf16 at well
    under 1 GFLOP/s: a 2048^3 bf16 product took over a minute on such an EPYC), so that the
    measurement never dominates a short run."""
    def rate(dtype: torch.dtype, n: int, reps: int) -> float:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        ts = []
        for _ in range(reps + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return 2 * n ** 3 / statistics.median(ts[1:])  # the first product warms the kernel up

    if device == "cuda":
        return {"bf16": rate(torch.bfloat16, 8192, 10)}
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        n = 2048
        r = rate(dtype, 128, 1)
        while n > 128 and 2 * n ** 3 / r > budget_s / 5:
            n //= 2
        out[name] = rate(dtype, n, 5)
    return out


class StepClock:
    """Records the wall time of every optimizer-step end (CUDA-synchronised), the loss and the
    peak memory so far."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.t_prev = time.perf_counter()
        self.times: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []
        self.peak_mb = 0.0

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.t_prev = time.perf_counter()

    def tick(self, tokens: int) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()  # the step's kernels are done, not just queued
        now = time.perf_counter()
        self.times.append(now - self.t_prev)
        self.t_prev = now
        self.tokens.append(int(tokens))
        self.peak_mb = peak_mem_mb(self.device)


def bf16_supported(device: str = "cpu") -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def load_rows(path: str, in_step_order: bool) -> list[dict]:
    """The shared rows (``input_ids``/``labels`` lists of one length). ``in_step_order``: permuted
    into the order fastft's Trainer draws them (``fastft.train.trainer.epoch_order``), for a sequential
    reader; otherwise as stored, for fastft's Trainer to permute itself."""
    d = torch.load(path)
    order = d["order"] if in_step_order else range(d["input_ids"].shape[0])
    return [{"input_ids": d["input_ids"][i].tolist(), "labels": d["labels"][i].tolist()} for i in order]


def process_settings() -> dict:
    """What this process runs with: malloc pages (asked for and granted), threads."""
    from fastft.runtime import describe

    huge_mb = 0.0
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                huge_mb = int(line.split()[1]) / 1024
    except OSError:
        pass
    import platform

    name = torch.cuda.get_device_name() if torch.cuda.is_available() and torch.cuda.is_initialized() else platform.processor()
    return {"device_name": name, "malloc": "huge pages" if "huge pages" in describe() else "default",
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "anon_huge_pages_mb_end": huge_mb,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}


# ------------------------------------------------------------------------------------ HF side
def run_hf(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(spec["seed"])
    device = spec.get("device", "cpu")
    side = spec["side"]
    mode, bf16 = spec["mode"], bf16_supported(device)
    notes = []
    want = spec.get("hf_base_dtype", "auto")
    kwargs: dict = {"attn_implementation": "sdpa"}
    if mode == "int8" and spec.get("hf_int8") == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        notes.append("int8 base via bitsandbytes LLM.int8 (Linear8bitLt)")
        base_dtype = torch.bfloat16 if bf16 else torch.float32
    elif want != "auto":
        base_dtype = torch.bfloat16 if want == "bf16" else torch.float32
    elif mode == "full":
        base_dtype = torch.float32  # fp32 masters, bf16 autocast compute: HF's mixed-precision recipe
    else:
        # LoRA (and int8 without bitsandbytes): the frozen base loaded in bf16, PEFT's fp32 adapters
        # under bf16 autocast - the usual PEFT recipe, and faster here than an fp32 base
        base_dtype = torch.bfloat16 if bf16 else torch.float32
        if mode == "int8":
            notes.append("bitsandbytes not installed: HF side runs its bf16 LoRA path instead of int8")
    if not bf16:
        notes.append(f"no bf16 units on this {device}: HF runs fp32 without autocast")
    # the checkpoint in the dtype it is loaded in (as on the hub): no fp32 file pages in the RSS
    folder = spec["hf_models"]["bf16" if base_dtype == torch.bfloat16 else "fp32"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=base_dtype, **kwargs)
    if mode in ("lora", "int8"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    rows = load_rows(spec["data"], in_step_order=True)
    train = [{"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.ones(len(r["input_ids"]), dtype=torch.long),
              "labels": torch.tensor(r["labels"])} for r in rows]
    clock = StepClock(device)
    tokens_per_step = spec["batch"] * len(rows[0]["input_ids"])  # fixed-length rows: no padding

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.tick(tokens_per_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    extra = {}
    if side == "hf_compile":
        extra["torch_compile"] = True  # inductor; the first steps compile (untimed warm-up)
    if side == "hf_liger":
        extra["use_liger_kernel"] = True
    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["total_steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=bf16, optim="adamw_torch_fused", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], seed=spec["seed"], data_seed=spec["seed"], disable_tqdm=True, use_cpu=device == "cpu",
        dataloader_num_workers=0, train_sampling_strategy="sequential", remove_unused_columns=False, **extra)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[Clock()])
    trainer.train()
    return {"side": side, "step_times": clock.times, "losses": clock.losses, "tokens": clock.tokens,
            "peak_mem_mb": clock.peak_mb, "notes": notes,
            "settings": {"base_dtype": str(base_dtype).replace("torch.", ""), "bf16_autocast": bf16,
                         "optim": "adamw_torch_fused", "attn": "sdpa", "torch_compile": side == "hf_compile",
                         "use_liger_kernel": side == "hf_liger"}}


# -------------------------------------------------------------------------------- fastft side
def run_fastft(spec: dict) -> dict:
    from fastft.config import load_config
    from fastft.data import DataBundle
    from fastft.train.cli import build
    from fastft.train.trainer import Trainer

    mode = spec["mode"]
    device = spec.get("device", "cpu")
    ov = {"model.path": spec["model"], "finetune.mode": "full" if mode == "full" else "lora",
          "lora.r": LORA_R, "lora.alpha": LORA_ALPHA, "lora.dropout": 0.0,
          "lora.target_modules": ",".join(LORA_TARGETS), "lora.int8_base": mode == "int8",
          "data.max_length": spec["seq"], "data.val_ratio": 0.0, "train.batch_size": spec["batch"],
          "train.grad_accum": 1, "train.max_steps": spec["total_steps"], "train.lr": spec["lr"],
          "train.scheduler": "constant", "train.warmup_steps": 0, "train.weight_decay": 0.0,
          "train.max_grad_norm": 1.0, "train.seed": spec["seed"], "train.progress": False,
          "train.log_every": 1, "train.device": device, "output.tensorboard": False,
          "output.dir": spec["run_dir"]}
    for item in spec.get("fastft_overrides", []):  # e.g. train.lr=0.02 (the bench test uses this)
        k, _, v = item.partition("=")
        ov[k] = v
    cfg = load_config(None, [tok for k, v in ov.items() for tok in (f"--{k}", str(v))])
    rows = load_rows(spec["data"], in_step_order=False)
    model, tok, bundle, dev = build(cfg, bundle=DataBundle(train=rows))
    clock = StepClock(device)

    class ClockedTrainer(Trainer):
        def train_step(self):
            rec = super().train_step()
            clock.tick(rec["tokens"])
            clock.losses.append(float(rec["loss"]))
            return rec

    Path(spec["run_dir"]).mkdir(parents=True, exist_ok=True)
    trainer = ClockedTrainer(cfg, Path(spec["run_dir"]), model, tok, bundle, dev, log=lambda s: None)
    clock.start()
    trainer.train()
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    return {"side": "fastft", "step_times": clock.times, "losses": clock.losses, "tokens": clock.tokens,
            "peak_mem_mb": clock.peak_mb, "notes": [],
            "settings": {"param_dtypes": dtypes, "fused_ce": cfg.model.fused_ce,
                         "lora_impl": ("-" if mode == "full" else "peft" if hasattr(model, "peft_config") else "fastft"),
                         "overrides": spec.get("fastft_overrides", [])}}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    device = spec.get("device", "cpu")
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    out = run_hf(spec) if spec["side"] in HF_SIDES else run_fastft(spec)
    out["peak_mem_mb_end"] = peak_mem_mb(device)
    out["settings"].update(process_settings())
    out["memory_measure"] = "torch.cuda.max_memory_allocated" if device == "cuda" else "ru_maxrss"
    # the GEMM rate under the load this run saw (the machine is shared), measured after training so
    # that its operands neither count as the side's memory nor shape malloc's heap before the run
    # (freeing an mmapped 16 MB block raises glibc's mmap threshold to 16 MB)
    out["gemm_flops"] = gemm_rates(device)
    out["load_avg_end"] = os.getloadavg()[0]
    out["threads"] = torch.get_num_threads()
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
