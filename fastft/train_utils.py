"""Pieces of the training loop: dtype choice, optimizer and lr schedule. The loss lives with the
model adapters (``fastft.models.loss``: each family's head transform decides it); its names are
re-exported here for the callers that import them from the training side."""
from __future__ import annotations

import math

import torch

from fastft.models import unwrap
from fastft.models.loss import CausalLMLoss, causal_suffices, ce_sum

__all__ = ["CausalLMLoss", "build_optimizer", "causal_suffices", "ce_sum", "lr_factor", "resolve_device",
           "resolve_dtype", "set_lr", "unwrap"]


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
                      max_grad_norm=cfg_train.max_grad_norm or None, master_weights=low_precision,
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
