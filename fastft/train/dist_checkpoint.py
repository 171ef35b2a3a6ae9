"""Checkpoints of multi-process runs: torch.distributed.checkpoint (DCP), sharded, resharding.

Layout of ``<run>/checkpoints/step-000120/`` written by N ranks:

* ``dcp/``: DCP files of ``{"model": trainable weights, "optim": optimizer state}``, keyed by
  parameter name (``torch.distributed.checkpoint.state_dict``). Every rank writes its own shards
  in parallel (FSDP2: its DTensor shards; DDP: the replicated tensors, deduplicated by DCP);
* ``rng/rank-00003.pt``: each rank's RNG states (dropout after a resume equals an
  uninterrupted run on every rank, not only on rank 0);
* ``trainer_state.pt`` (rank 0): step, data position, early-stopping state, loss scale, and the
  world size and per-rank batch it was written with;
* ``adapter/`` (LoRA, rank 0): the PEFT adapter, so every checkpoint stays loadable by PEFT.

Atomic: all ranks write into one temporary ``.step-...`` folder (its name chosen by rank 0),
rank 0 renames it to ``step-...`` only after every rank finished, so a ``kill -9`` during a save
leaves the previous checkpoint as the newest loadable one.

Resharding: DCP loads into whatever layout the model has now, so a checkpoint written with 2
ranks resumes with 1 (a plain model: DCP runs without a process group) or 4; a single-process
checkpoint (``fastft.train.checkpoint`` layout) resumes on N ranks through full state dicts. The data
position is stored as (epoch, offset in the epoch's global permutation) and converted to the new
world size's micro-batch counter.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict,
                                                     set_state_dict)

from fastft.atomic_files import replace_dir
from fastft.errors import UserError
from fastft.train import checkpoint as ck
from fastft.train import distributed as dist

_OPTS = StateDictOptions(ignore_frozen_params=True)
# loading: the frozen weights come from the base model, so they are not "missing"; a trainable
# key missing from the checkpoint still fails (dcp.load reads every key of the template)
_LOAD_OPTS = StateDictOptions(ignore_frozen_params=True, strict=False)


def is_dcp(ckpt: Path) -> bool:
    return (Path(ckpt) / "dcp").is_dir()


def _rng_file(folder: Path, r: int) -> Path:
    return folder / "rng" / f"rank-{r:05d}.pt"


def save(ckpt_root: Path, step: int, model, optimizer, tokenizer, is_lora: bool, state: dict) -> Path | None:
    """Collective: every rank calls it. Returns the checkpoint path (on every rank)."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step-{step:06d}"
    name = [None]
    if dist.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        ck.remove_debris(ckpt_root.parent)  # what an earlier killed save left (as ck.save_checkpoint)
        name[0] = tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=ckpt_root)
    tdist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        msd, osd = get_state_dict(model, optimizer, options=_OPTS)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        # the PEFT adapter of every checkpoint: FSDP2's LoRA shards are gathered to rank 0 first
        adapter = full_state_dict(model, trainable_only=True) if is_lora and is_sharded(model) else None
        _rng_file(tmp, dist.rank()).parent.mkdir(exist_ok=True)
        torch.save(state.pop("rng"), _rng_file(tmp, dist.rank()))
        if dist.is_main():
            torch.save({**state, "world_size": dist.world_size(),
                        "fp32_shards": bool(getattr(model, "_fastft_export_dtypes", None))},
                       tmp / "trainer_state.pt")
            if is_lora:
                ck.save_model_files(model, tokenizer, tmp, is_lora, state_dict=adapter)
        dist.barrier()  # every rank's shards and RNG are on disk
        if dist.is_main():
            replace_dir(tmp, final)  # re-saving the same step (Ctrl-C right after a periodic save)
    except BaseException:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return final


def load(ckpt: Path, model, optimizer, is_lora: bool) -> dict:
    """Restore weights and optimizer state (any world size, either layout) and this rank's RNG;
    returns the trainer state (counters; ``world_size`` of the run that wrote it)."""
    ckpt = Path(ckpt)
    if is_dcp(ckpt):
        saved = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        if saved.get("fp32_shards") and not getattr(model, "_fastft_export_dtypes", None):
            raise UserError(f"checkpoint {ckpt}: written by a 16-bit FSDP run (fp32 shards, no separate "
                            "masters); resume it with train.distributed=fsdp on 2+ ranks, or train in fp32")
        msd, osd = get_state_dict(model, optimizer, options=_OPTS)  # the layout to load into
        sd = {"model": msd, "optim": osd}
        with warnings.catch_warnings():  # one process reading a multi-rank checkpoint is intended
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(sd, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                       options=_LOAD_OPTS)
        st = saved
        rng = _rng_file(ckpt, dist.rank())
        st["rng"] = torch.load(rng, map_location="cpu", weights_only=False) if rng.is_file() else None
        return st
    # a single-process checkpoint (fastft.train.checkpoint layout) on N ranks
    st = ck.load_state(ckpt)
    if not is_sharded(model):
        ck.load_model_files(model, ckpt, is_lora)
        optimizer.load_state_dict(st["optimizer"])
    else:
        _load_full_into_sharded(model, optimizer, ckpt, st["optimizer"], is_lora)
    st["world_size"] = st.get("world_size", 1)
    if dist.rank() != 0:
        st["rng"] = None  # only rank 0's RNG was saved
    return st


def load_weights(ckpt: Path, model) -> None:
    """Collective: the trainable weights of DCP checkpoint ``ckpt`` into ``model`` in its
    current layout (FSDP2 shards, DDP replicas or one process), e.g. the best checkpoint at the
    end of a run; the optimizer state is not read."""
    msd = get_model_state_dict(model, options=_OPTS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load({"model": msd}, checkpoint_id=str(Path(ckpt) / "dcp"))
    set_model_state_dict(model, msd, options=_LOAD_OPTS)


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _load_full_into_sharded(model, optimizer, ckpt: Path, osd: dict, is_lora: bool = False) -> None:
    """HF weights (or a PEFT adapter) + an index-keyed optimizer state dict (one process) into
    FSDP2's shards."""
    from safetensors.torch import load_file

    if is_lora:  # each rank copies its part of every adapter tensor into its shard
        ck.load_model_files(model, ckpt, is_lora)
    else:
        state = {}
        for f in sorted((ckpt / "model").glob("*.safetensors")):
            state.update(load_file(str(f)))
        if not state:
            raise UserError(f"checkpoint {ckpt}: no model/*.safetensors to resume full fine-tuning from")
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    # torch.optim state dicts key parameters by their position in the param groups; DCP's
    # full optimizer state dict keys them by name
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in osd["param_groups"] for i in g["params"]]
    fqn_state = {order[k]: osd["state"][i] for k, i in enumerate(saved_ids) if i in osd["state"]}
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [order[k] for k in range(off, off + len(g["params"]))]}
              for off, g in zip(_offsets(osd["param_groups"]), osd["param_groups"])]
    set_optimizer_state_dict(model, optimizer, {"state": fqn_state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def _offsets(groups: list[dict]) -> list[int]:
    out, k = [], 0
    for g in groups:
        out.append(k)
        k += len(g["params"])
    return out


def full_state_dict(model, trainable_only: bool = False) -> dict:
    """Collective: the whole model's weights (``trainable_only``: only those that train, e.g. the
    LoRA adapters of a frozen sharded base) as plain CPU tensors on rank 0 ({} elsewhere)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=trainable_only))
    if not dist.is_main():
        return {}
    # FSDP2 kept a 16-bit run's shards in fp32 (fastft.train.distributed._upcast_for_fsdp): write the
    # dtypes a single-process run writes
    dtypes = getattr(model, "_fastft_export_dtypes", {})
    return {k: v.to(dtypes[k]) if k in dtypes else v for k, v in sd.items()}


def micro_pos_for(st: dict, micro_per_epoch: int, batch_size: int) -> int:
    """The micro-batch counter of this run that continues where the checkpoint stopped.

    Global micro-batch i of a run with per-rank batch b on N ranks is positions [i*b*N,
    (i+1)*b*N) of its epoch's permutation (fastft.train.distributed.shard), so the position is
    (epoch, offset) and the new counter is epoch * micro_per_epoch + offset / (b' * N'),
    rounded up when the new global micro-batch does not divide the offset."""
    old_ws, old_b = st.get("world_size", 1), st.get("batch_size", batch_size)
    old_mpe = st.get("micro_per_epoch")
    if old_ws == dist.world_size() and old_b == batch_size or old_mpe is None:
        return st["micro_pos"]
    epoch, i = divmod(st["micro_pos"], old_mpe)
    offset = i * old_b * old_ws
    new = batch_size * dist.world_size()
    return epoch * micro_per_epoch + -(-offset // new)
