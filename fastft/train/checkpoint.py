"""Checkpoints: written atomically (temp dir, then rename), last K kept plus the best.

Layout of ``<run>/checkpoints/step-000120/``:

* ``adapter/`` (LoRA, PEFT format) or ``model/`` (HF ``save_pretrained``, other modes);
* ``trainer_state.pt``: optimizer (incl. the masters: int16 low halves of split masters, whose high
  halves are the saved bf16 weights, or fp32 copies), step, data position, RNG states,
  early-stopping state, loss scale.

``<run>/checkpoints/best`` is a text file naming the best checkpoint directory.

A save killed half-way leaves a ``.step-000120.<random>`` folder (hundreds of MB for a full
model); ``remove_debris`` deletes those (fastft's own temp names only) at resume and before
every save. Nothing non-finite is ever written: ``save_model_files`` and ``save_checkpoint``
check the trainable weights and the optimizer state first.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastft.atomic_files import replace_dir

STEP_RE = re.compile(r"^step-(\d+)$")
# temp names of tempfile.mkdtemp/mkstemp (8 random characters) used by this module, the trainer's
# final/ save and save_config
_DEBRIS_DIRS = re.compile(r"^\.(step-\d+|final)\.[A-Za-z0-9_]{8}$")
_DEBRIS_FILES = re.compile(r"^\.(best|config|metrics\.jsonl)[A-Za-z0-9_]{8}$")


def remove_debris(folder: Path) -> list[str]:
    """Delete what interrupted saves left in a run dir or its ``checkpoints/`` (and only that);
    returns the names removed."""
    gone = []
    for root in (Path(folder), Path(folder) / "checkpoints"):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            if p.is_dir() and _DEBRIS_DIRS.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
            elif p.is_file() and _DEBRIS_FILES.match(p.name):
                p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone


def first_non_finite(named: dict) -> str | None:
    """Name of the first floating tensor in ``named`` (nested dicts/lists too) holding NaN or inf."""
    stack = [("", named)]
    while stack:
        name, v = stack.pop()
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
                return name
        elif isinstance(v, dict):
            stack += [(f"{name}.{k}" if name else str(k), x) for k, x in v.items()]
        elif isinstance(v, (list, tuple)):
            stack += [(f"{name}[{i}]", x) for i, x in enumerate(v)]
    return None


def check_finite(named: dict, what: str) -> None:
    """Raise TrainingDiverged instead of writing a NaN/inf tensor to disk."""
    bad = first_non_finite(named)
    if bad is not None:
        from fastft.errors import TrainingDiverged

        raise TrainingDiverged(f"not saving {what}: {bad} holds NaN or inf")


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name, dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_model_files(model, tokenizer, out: Path, is_lora: bool, state_dict: dict | None = None) -> None:
    """Adapter (PEFT format) for LoRA, else a full HF folder; the tokenizer next to it.
    ``state_dict``: the full weights to write instead of the model's own (FSDP's gathered shards;
    for LoRA the trainable ones suffice)."""
    from fastft.train.finetune import save_adapter

    # the gathered copy when given: the model's own parameters are then DTensor shards, whose
    # reductions are collectives that only this rank would enter
    check_finite(state_dict if state_dict is not None else
                 {n: p for n, p in model.named_parameters() if p.requires_grad}, str(out))
    if is_lora:
        save_adapter(model, str(out / "adapter"), state_dict)
    else:
        from fastft.train.precision import record_run_dtype

        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(str(out / "model"), safe_serialization=True, **extra)
        record_run_dtype(model, out / "model")  # fp32 embeddings/norms: still a bf16 model
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / ("adapter" if is_lora else "model")))


def save_checkpoint(ckpt_root: Path, step: int, model, tokenizer, is_lora: bool, state: dict) -> Path:
    """Write ``step-<step>`` under ``ckpt_root`` atomically and return its path."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_debris(ckpt_root.parent)
    check_finite(state.get("optimizer", {}), f"checkpoint step {step} (optimizer state)")
    final = ckpt_root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=ckpt_root))
    try:
        save_model_files(model, tokenizer, tmp, is_lora)
        torch.save(state, tmp / "trainer_state.pt")
        replace_dir(tmp, final)  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def best_checkpoint(ckpt_root: Path) -> Path | None:
    f = ckpt_root / "best"
    if f.is_file():
        p = ckpt_root / f.read_text().strip()
        return p if p.is_dir() else None
    return None


def mark_best(ckpt_root: Path, ckpt: Path) -> None:
    atomic_write_text(ckpt_root / "best", ckpt.name)


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints and the best one."""
    best = best_checkpoint(ckpt_root)
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if best is None or p.resolve() != best.resolve():
            shutil.rmtree(p, ignore_errors=True)


def load_model_files(model, ckpt: Path, is_lora: bool) -> None:
    """Restore the trainable weights saved by ``save_model_files`` into ``model`` in place."""
    if is_lora:
        from fastft.train.finetune import load_adapter

        load_adapter(model, str(ckpt / "adapter"))
        return
    from safetensors.torch import load_file

    state = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied lm_head.weight is not stored; anything else missing means a different model
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        from fastft.errors import UserError

        raise UserError(f"checkpoint {ckpt} does not match the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
