"""Pieces of the training loop: dtype choice, optimizer and lr schedule. The loss lives with the
model adapters (``fastft.models.loss``: each family's head transform decides it); its names are
re-exported here for the callers that import them from the training side."""
from __future__ import annotations

import math

import torch

from fastft.models import unwrap
from fastft.models.loss import _WARNED, CausalLMLoss, attention_inputs, causal_suffices, ce_sum  # noqa: F401

__all__ = ["CausalLMLoss", "attention_inputs", "build_optimizer", "causal_suffices", "ce_sum", "lr_factor",
           "resolve_device", "resolve_dtype", "set_lr", "unwrap"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fastft.errors import ConfigError

        raise ConfigError("train.device=cuda: no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 where the hardware has bf16 units (AVX-512 BF16 / AMX, Ampere+), else fp32
    on CPU and fp16 on GPU. bf16 GEMMs run ~2.3x fp32 on this EPYC (ENVIRONMENT.md)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        ok = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
        return torch.bfloat16 if ok else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def build_optimizer(groups: list[dict], cfg_train, low_precision: bool) -> torch.optim.Optimizer:
    """FusedAdamW over the groups: fused global-norm clipping, fp32-exact masters for bf16/fp16
    params (bf16: ``train.master_format``, split by default; fp16: always a full fp32 copy)."""
    from fastft.optim import FusedAdamW

    clean = [{**{k: v for k, v in g.items() if k != "names"}, "base_lr": g["lr"]} for g in groups]
    return FusedAdamW(clean, lr=cfg_train.lr, betas=(cfg_train.adam_beta1, cfg_train.adam_beta2),
                      eps=cfg_train.adam_eps, weight_decay=cfg_train.weight_decay,
                      # inf: no clipping, but the norm is still computed and a non-finite one skips the step
                      max_grad_norm=cfg_train.max_grad_norm or float("inf"), master_weights=low_precision,
                      master_format=cfg_train.master_format)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup from
    1/warmup to 1, then linear/cosine decay to 0 at ``total``, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


class LrSchedule:
    """``lr_factor`` over ``total`` steps, plus how a resumed run continues when its length changes.

    The rule when ``train.max_steps`` (or epochs) changes at a resume from step ``s0``: every step
    already taken keeps its lr, and the lr never jumps. While the run is still warming up
    (``s0 <= warmup``) the schedule is recomputed over the new total with the same number of warmup
    steps (the warmup steps taken are unchanged). Later, the lr continues from the factor ``f`` of
    the last step taken (``s0 - 1``) and decays with the same shape (linear/cosine; constant stays
    constant) to 0 at the new total: ``factor(s) = f * shape((s - s0 + 1) / (total - s0 + 1))``.
    So a finished cosine run extended from 10 to 20 steps continues at its small final lr instead
    of restarting the decay (which jumped 2e-4 -> 1.5e-3 before); to re-warm, start a new run from
    ``<run>/final``.
    """

    def __init__(self, total: int, warmup: int, kind: str):
        self.total, self.warmup, self.kind = total, warmup, kind
        self.anchor: tuple[int, float] | None = None  # (last step taken, its factor) of an extension
        self.before: LrSchedule | None = None  # the schedule of the steps before the anchor

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at 0-based optimizer step ``step``."""
        if self.anchor is None:
            return lr_factor(step, self.total, self.warmup, self.kind)
        if step < self.anchor[0]:
            return self.before.factor(step)
        s, f = self.anchor
        if self.kind == "constant":
            return f
        p = min(1.0, (step - s) / max(1, self.total - s))
        return f * (1.0 - p if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * p)))

    def extend(self, step: int, total: int) -> str:
        """Continue at step ``step`` (steps taken so far) to ``total`` steps; returns the one-line
        description of how the schedule continues."""
        old = self.total
        if step <= self.warmup:
            self.total = total
            return (f"train.max_steps {old} -> {total} at step {step}: still in warmup; the {self.kind} schedule "
                    f"is recomputed over {total} steps (the steps taken keep their lr)")
        last = step - 1
        f = self.factor(last)
        prev = LrSchedule(old, self.warmup, self.kind)
        prev.anchor, prev.before = self.anchor, self.before
        self.anchor, self.before, self.total = (last, f), prev, total
        how = "stays constant" if self.kind == "constant" else f"decays ({self.kind}) to 0 at step {total}"
        return (f"train.max_steps {old} -> {total} at step {step}: the lr continues from the last step's "
                f"(x{f:.3g} of train.lr) and {how}; steps 1-{step} keep their lr")

    def state_dict(self) -> dict:
        return {"total": self.total, "warmup": self.warmup, "kind": self.kind, "anchor": self.anchor,
                "before": self.before.state_dict() if self.before else None}

    def load_state_dict(self, st: dict) -> None:
        self.total, self.warmup, self.kind = st["total"], st["warmup"], st["kind"]
        self.anchor = tuple(st["anchor"]) if st.get("anchor") else None
        self.before = None
        if st.get("before"):
            self.before = LrSchedule(1, 0, self.kind)
            self.before.load_state_dict(st["before"])
