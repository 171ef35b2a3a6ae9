"""Multi-process training on PyTorch's own engine: torchrun + torch.distributed, DDP and FSDP2.

Launched as ``torchrun --nproc-per-node N -m fastft train CONFIG.yaml`` (torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), :func:`init` starts the process group: NCCL on GPU,
gloo on CPU, with ``train.distributed_timeout`` as the collective timeout (a dead rank ends the
job instead of hanging it). The strategy (``train.distributed``):

* ``none``: one process (``auto`` picks it when WORLD_SIZE is unset or 1);
* ``ddp``: DistributedDataParallel around the loss module; every rank holds the whole model and
  gradients are averaged once per optimizer step (``no_sync`` on the other micro-batches).
  ``auto`` picks it for LoRA, partial and head fine-tuning: the trainable part is small, so the
  all-reduce is too;
* ``fsdp``: FSDP2 ``fully_shard`` on every decoder layer, then on the root (the loss module, so
  its forward gathers the embeddings, final norm and head). Parameters, gradients and optimizer
  state are sharded on dim 0 (DTensor ``Shard(0)``); ``auto`` picks it for full fine-tuning.
  With LoRA (a base too big for one device) the frozen base and the adapters are sharded alike;
  only the adapters get gradients, and exports gather only them to rank 0.

Maths (identical for both strategies, so N ranks x batch B/N = 1 rank x batch B): each rank takes
a disjoint, deterministic share of every global batch (:func:`shard`); the step's target tokens
are counted on every rank and summed (:func:`global_count`) before the first backward; every
rank divides its summed loss by (global count / world size) and DDP/FSDP average the gradients
over ranks, which gives sum(all losses) / global count. FusedAdamW's clipping uses the global
norm: under FSDP each rank holds a shard of every gradient, so the squared local norms are summed
(:func:`sum_sq_norms`); under DDP every rank already holds the whole averaged gradient.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from fastft.errors import ConfigError
from fastft.train.utils import unwrap

STRATEGIES = ("auto", "none", "ddp", "fsdp")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(requested: str, finetune_mode: str, world: int | None = None) -> str:
    """``none|ddp|fsdp`` for ``train.distributed`` = ``requested`` with ``world`` processes.

    Raises:
        ConfigError: ``none`` with several processes (each would train alone and they would
            overwrite each other's run directory).
    """
    world = launched_world_size() if world is None else world
    if world <= 1:
        return "none"
    if requested == "none":
        raise ConfigError(f"train.distributed=none, but torchrun started {world} processes; use auto, ddp "
                          "or fsdp, or launch one process")
    if requested == "auto":
        return "fsdp" if finetune_mode == "full" else "ddp"
    return requested


def check_supported(strategy: str, cfg) -> None:
    """One-line ConfigError for mixes that cannot run distributed, before the model loads."""
    if strategy == "none":
        return
    if cfg.finetune.unfreeze_after_steps:
        # DDP fixes its set of synchronised parameters (FSDP2 its gradient buffers) when it wraps
        raise ConfigError(f"finetune.unfreeze_after_steps is not supported with train.distributed={strategy}")
    if strategy != "fsdp":
        return
    if cfg.finetune.mode == "lora" and cfg.lora.int8_base:
        # int8 weights are module buffers (fastft.models.lora.Int8Linear), which FSDP2 never shards:
        # every rank would still hold the whole int8 base
        raise ConfigError("train.distributed=fsdp with lora.int8_base: FSDP2 does not shard int8 base weights "
                          "(buffers); use train.distributed=ddp, or a 16-bit base with fsdp")
    if cfg.finetune.mode == "lora" and cfg.output.save_merged:
        raise ConfigError("output.save_merged with train.distributed=fsdp: the merge needs the whole base "
                          "model on one rank; merge the final adapter afterwards in one process")
    if cfg.data.format == "classification":
        raise ConfigError("train.distributed=fsdp with data.format=classification is not supported; use ddp")


def init(device: torch.device, timeout_s: float = 600.0) -> bool:
    """Start the process group when launched with torchrun; True when distributed."""
    if launched_world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def local_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun (each rank its own GPU)."""
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


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


def global_count(counts: torch.Tensor) -> torch.Tensor:
    """Target/token counts of this rank's micro-batches -> the counts of the global batch
    (fp64 1-D tensor, summed in place over ranks). The loss of an optimizer step is normalised
    by this global count, never a per-rank one."""
    return all_reduce_sum(counts)


def sum_sq_norms(sumsq: torch.Tensor) -> torch.Tensor:
    """Global sum of squared gradient norms from this rank's local shards (0-dim fp64/fp32
    tensor; summed in place). FusedAdamW calls it only for sharded (DTensor) parameters."""
    return all_reduce_sum(sumsq)


class RankLost(RuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


_COMM_HINTS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
               "broken pipe", "socket")


def lost_rank_error(exc: BaseException, timeout_s: float) -> RankLost | None:
    """The one-line error for ``exc`` when it is a failed collective of a multi-rank run
    (None otherwise: a bug or a user error keeps its own message)."""
    if world_size() <= 1 or isinstance(exc, (KeyboardInterrupt, ConfigError)):
        return None
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, getattr(dist, "DistError", ())) or any(h in msg.lower() for h in _COMM_HINTS):
        return RankLost(f"rank {rank()} of {world_size()} lost contact with the other ranks (one died, or did "
                        f"not answer within train.distributed_timeout={timeout_s:g} s): {msg[:300]}")
    return None


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (e.g. a Ctrl-C/SIGTERM that reached some
    ranks only: all of them must stop after the same step, or the others hang in a collective)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(indices: list[int]) -> list[int]:
    """This rank's share of an epoch's permutation (DistributedSampler-style, padded by wrapping
    so every rank runs the same number of batches). Rank r takes positions r, r+N, r+2N, ...: with
    per-rank batch b, global micro-batch i is positions [i*b*N, (i+1)*b*N) of the permutation,
    the same examples one process with batch b*N would take."""
    ws = world_size()
    if ws == 1 or not indices:
        return indices
    total = -(-len(indices) // ws) * ws
    padded = [indices[i % len(indices)] for i in range(total)]  # cycles, even when n < ws
    return padded[rank():total:ws]


def eval_shard(n: int) -> tuple[list[int], int]:
    """(this rank's indices into ``n`` evaluation examples, how many of them are real): the
    positions ``rank, rank + N, ...`` of ``range(n)`` padded by wrapping to a multiple of N, so
    every rank runs as many batches; the real ones come first, the rest must carry no loss."""
    mine = shard(list(range(n)))
    return mine, len(range(rank(), n, world_size()))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF model (``model.model.layers`` and the like)."""
    lm = unwrap(model)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers"):
        obj = lm
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj):
            return list(obj)
    return []


def wrap(loss_mod: nn.Module, strategy: str, device: torch.device, log=print) -> nn.Module:
    """The module the training step calls: ``loss_mod`` itself (none), DDP around it, or
    ``loss_mod`` with its model's decoder layers and then itself FSDP2-sharded (in place)."""
    if strategy == "none" or world_size() == 1:
        return loss_mod
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(loss_mod, device_ids=ids, find_unused_parameters=False)
    from torch.distributed.fsdp import fully_shard

    kw = {}
    low = _upcast_for_fsdp(loss_mod.model)
    if low is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        log(f"train.distributed=fsdp: trainable sharded weights are kept in fp32 (their own AdamW masters), "
            f"frozen ones as they are, and all are gathered as {str(low).split('.')[1]} for compute")
    layers = decoder_layers(loss_mod.model)
    if not layers:
        log("train.distributed=fsdp: no decoder layer list found; sharding the whole model as one unit")
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(loss_mod, **kw)
    return loss_mod


@torch.no_grad()
def _upcast_for_fsdp(module: nn.Module) -> torch.dtype | None:
    """FSDP2 needs one dtype for the trainable parameters of a sharded group, but a bf16 run
    keeps trainable norms and embeddings in fp32 (fastft/train/precision.py), and FusedAdamW keeps no
    separate masters for sharded 16-bit parameters. So a run with 16-bit weights stores every
    trainable weight in fp32 (exact fp32 source values where fastft.train.precision attached them)
    and FSDP2's MixedPrecisionPolicy casts the shards to the run dtype before the all-gather: the
    communication and the compute stay 16-bit, and the fp32 shards are AdamW's masters. Frozen
    weights (a LoRA run's base) stay 16-bit: FSDP2 only asks trainable ones for one dtype.
    Returns the run dtype (None for an fp32 run: nothing to do). The original dtypes are kept in
    ``module._fastft_export_dtypes`` so the final export matches a single-process run's."""
    low = {p.dtype for p in module.parameters()} & {torch.bfloat16, torch.float16}
    if not low:
        return None
    if len(low) > 1:
        raise ConfigError("train.distributed=fsdp: the model mixes bf16 and fp16 weights")
    module._fastft_export_dtypes = {n: p.dtype for n, p in module.named_parameters()}
    for p in module.parameters():
        src = p.__dict__.pop("_fastft_master_init", None)
        if p.requires_grad and p.dtype != torch.float32:
            p.data = src if src is not None and src.shape == p.shape else p.data.float()
    return low.pop()


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def grad_sync(module: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradient communication only on the last
    micro-batch of a step (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync``), the others
    accumulate locally."""
    if hasattr(module, "no_sync"):
        return contextlib.nullcontext() if sync else module.no_sync()
    if is_fsdp(module):
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def to_local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise), without a copy or a new
    DTensor: the FSDP2 local shard is a fixed view into its sharded storage, so its address
    is the same every step."""
    return t._local_tensor if _is_dtensor(t) else t


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def seed_ranks(seed: int) -> None:
    """Independent dropout masks per rank: rank r reseeds torch with seed + 1000003 r. Called
    only with several ranks and after the model is built, so the weights and the LoRA
    initialisation stay identical on every rank."""
    torch.manual_seed(seed + 1_000_003 * rank())


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
