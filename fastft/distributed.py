"""Rank helpers: single-process by default, torch.distributed when launched by torchrun.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; ``init()`` then starts a process group (gloo on CPU,
nccl on GPU). Rank 0 logs and writes checkpoints; every rank sees its own shard of each epoch's
permutation; loss sums and token counts are all-reduced so the loss is normalised by the global
number of target tokens.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device) -> bool:
    """Start the process group when launched with torchrun; True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op when not distributed). Returns ``t``."""
    if world_size() > 1:
        if dist.get_backend() == "nccl" and not t.is_cuda:  # NCCL reduces device tensors only
            tmp = t.cuda()
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(indices: list[int]) -> list[int]:
    """This rank's share of an epoch's permutation (DistributedSampler-style, padded by wrapping
    so every rank runs the same number of batches)."""
    ws = world_size()
    if ws == 1:
        return indices
    total = -(-len(indices) // ws) * ws
    padded = indices + indices[: total - len(indices)]
    return padded[rank():total:ws]


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP-wrap ``module`` when distributed (gradients are averaged over ranks)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=False)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
