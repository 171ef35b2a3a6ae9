"""One rank of the 2-process tests in tests/test_distributed.py (also the 1-process reference,
run in the test's own process). Trains each scenario a few steps through fastft's own
``build`` + ``Trainer.train_step`` and records the loss curve, grad norms and final weights.

    python tests/dist_worker.py OUT.pt TINY_MODEL_DIR SCENARIO[:bug] ...   (RANK/WORLD_SIZE set)

``bug`` swaps in a known-wrong reduction, to show that the comparison would catch it:
``local_tokens`` normalises each rank's loss by its own target count, ``local_clip`` clips each
FSDP shard by its own local norm.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

COMMON = ["--model.dtype", "fp32", "--model.dropout", "0", "--lora.dropout", "0", "--train.progress", "false",
          "--output.tensorboard", "false", "--train.scheduler", "constant", "--data.val_ratio", "0.05"]
# clipping active in every step: the pre-clip norms of these runs are 0.43-3.7 (LoRA's grow from
# B = 0), so max_grad_norm=0.3 always clips
SCENARIOS = {
    "ddp_lora": ["--finetune.mode", "lora", "--lora.r", "4", "--train.lr", "1e-2", "--train.max_grad_norm", "0.3",
                 "--train.distributed", "ddp"],
    "fsdp_full": ["--finetune.mode", "full", "--train.lr", "2e-3", "--train.max_grad_norm", "0.3",
                  "--train.distributed", "fsdp"],
    # FSDP2 of the frozen base with LoRA adapters (the 70B LoRA case): the adapters are sharded too
    "fsdp_lora": ["--finetune.mode", "lora", "--lora.r", "4", "--train.lr", "1e-2", "--train.max_grad_norm", "0.3",
                  "--train.distributed", "fsdp"],
    # the real embedded model (SmolLM2-135M), short rows: tests/test_distributed_smollm2.py
    "smol_lora": ["--finetune.mode", "lora", "--lora.r", "8", "--train.lr", "1e-3", "--train.max_grad_norm", "0.3",
                  "--train.distributed", "ddp", "--data.max_length", "64"],
    "smol_fsdp_lora": ["--finetune.mode", "lora", "--lora.r", "8", "--train.lr", "1e-3", "--train.max_grad_norm",
                       "0.3", "--train.distributed", "fsdp", "--data.max_length", "64"],
}
STEPS = 3


def scenario_args(name: str, world: int, global_batch: int = 8) -> list[str]:
    """``ddp_lora`` / ``fsdp_full`` with an optional ``_accum`` suffix (2 micro-batches per step)
    or ``_bf16`` (bf16 weights); the per-rank batch is the global batch / (accumulation x world)."""
    base, accum = (name[:-6], 2) if name.endswith("_accum") else (name, 1)
    base, bf16 = (base[:-5], ["--model.dtype", "bf16"]) if base.endswith("_bf16") else (base, [])
    return [*COMMON, *SCENARIOS[base], *bf16, "--train.grad_accum", str(accum),
            "--train.batch_size", str(global_batch // (accum * world)), "--train.max_steps", str(STEPS)]


def run_scenario(tiny: str, name: str, world: int, out_dir: Path) -> dict:
    """Train STEPS steps; returns {"loss": [...], "grad_norm": [...], "weights": {name: tensor}}
    (weights: full tensors on rank 0, gathered from FSDP shards)."""
    from fastft.train import dist_checkpoint as dcp_ck
    from fastft.train import distributed as dist
    from fastft.config import load_config
    from fastft.train import Recipe

    cfg = load_config(None, ["--model.path", tiny, "--output.dir", str(out_dir), *scenario_args(name, world)])
    recipe = Recipe(cfg, log=lambda s: None)
    recipe.load()
    recipe.data()
    model = recipe.adapt()
    tr = recipe.make_trainer(out_dir)
    ev = tr.evaluate(hook=False)  # 19 validation rows: 2 ranks get 10 + 9 (+1 pad)
    fused = _count_fused_layers()
    try:
        recs = [tr.train_step() for _ in range(STEPS)]
    finally:
        fused_calls = fused.pop()()
    if tr.strategy == "fsdp":
        weights = dcp_ck.full_state_dict(model)
    else:
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    export = _read_export(recipe.export(out_dir / "export"), cfg.finetune.mode == "lora")  # collective
    return {"export": export,"loss": [r["loss"] for r in recs], "grad_norm": [r["grad_norm"] for r in recs],
            "target_tokens": [r["target_tokens"] for r in recs], "strategy": tr.strategy, "eval": ev,
            "fused_layer_calls": fused_calls,
            "frozen_dtypes": {p.dtype for p in model.parameters() if not p.requires_grad},
            "weights": {n: w for n, w in weights.items() if n in trainable}, "rank": dist.rank()}


def _read_export(out: Path, is_lora: bool) -> dict:
    """The tensors ``Recipe.export`` wrote (rank 0; {} on the other ranks, which write nothing)."""
    from safetensors.torch import load_file

    from fastft.train import distributed as dist

    if not dist.is_main():
        return {}
    files = [out / "adapter" / "adapter_model.safetensors"] if is_lora else sorted((out / "model").glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _count_fused_layers() -> list:
    """Count the decoder layers that run as one fused node (fastft/models/fused_layer.py) from now on;
    returns [stop], where stop() undoes the wrapper and gives the count."""
    from fastft.models import hf_fast

    orig, n = hf_fast.fused_layer_forward, [0]

    def counted(*a, **k):
        n[0] += 1
        return orig(*a, **k)

    hf_fast.fused_layer_forward = counted

    def stop() -> int:
        hf_fast.fused_layer_forward = orig
        return n[0]
    return [stop]


def _inject(bug: str):
    """Replace a global reduction with the per-rank one; returns an undo function."""
    from fastft.train import distributed as dist
    from fastft import optim

    if bug == "local_tokens":
        saved, dist.global_count = dist.global_count, lambda t: t
        return lambda: setattr(dist, "global_count", saved)
    if bug == "local_clip":
        saved, optim.reduce_sumsq = optim.reduce_sumsq, lambda s, p: s
        return lambda: setattr(optim, "reduce_sumsq", saved)
    raise ValueError(bug)


def main(argv: list[str]) -> None:
    from fastft.train import distributed as dist

    out, tiny, names = Path(argv[0]), argv[1], argv[2:]
    torch.set_num_threads(1)
    results = {}
    for spec in names:
        name, _, bug = spec.partition(":")
        undo = _inject(bug) if bug else (lambda: None)
        try:
            results[spec] = run_scenario(tiny, name, dist.launched_world_size(), out.parent / f"run-{spec}")
        finally:
            undo()
    if dist.is_main():
        torch.save(results, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
