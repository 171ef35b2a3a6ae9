"""Checkpoints: written atomically (temp dir, then rename), last K kept plus the best.

Layout of ``<run>/checkpoints/step-000120/``:

* ``adapter/`` (LoRA, PEFT format) or ``model/`` (HF ``save_pretrained``, other modes);
* ``trainer_state.pt``: optimizer (incl. the masters: int16 low halves of split masters, whose high
  halves are the saved bf16 weights, or fp32 copies), step, data position, RNG states,
  early-stopping state, loss scale.

``<run>/checkpoints/best`` is a text file naming the best checkpoint directory.
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

STEP_RE = re.compile(r"^step-(\d+)$")


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
    ``state_dict``: the full weights to write instead of the model's own (FSDP's gathered shards)."""
    from fastft.finetune import save_adapter

    if is_lora:
        save_adapter(model, str(out / "adapter"))
    else:
        from fastft.precision import record_run_dtype

        model.save_pretrained(str(out / "model"), safe_serialization=True, state_dict=state_dict)
        record_run_dtype(model, out / "model")  # fp32 embeddings/norms: still a bf16 model
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / ("adapter" if is_lora else "model")))


def save_checkpoint(ckpt_root: Path, step: int, model, tokenizer, is_lora: bool, state: dict) -> Path:
    """Write ``step-<step>`` under ``ckpt_root`` atomically and return its path."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=ckpt_root))
    try:
        save_model_files(model, tokenizer, tmp, is_lora)
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
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
        from fastft.finetune import load_adapter

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
