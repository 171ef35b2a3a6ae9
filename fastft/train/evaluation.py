"""One evaluation loop for the whole package: the token-weighted causal-LM loss over examples.

:func:`loss_totals` is the loop (the trainer's held-out evaluation, ``fastft eval``, the per-task
metrics hook all run it); :func:`lm_eval` turns its totals into ``eval_loss``/``eval_ppl``;
:func:`make_metrics_hook` adds what the data asks for (classification metrics via
:func:`evaluate_classifier`, per-task losses).
"""
from __future__ import annotations

import math
import os

from typing import Sequence

import torch
from torch import nn

from fastft.data.collate import Collator
from fastft.models.loss import CausalLMLoss
from fastft.train import distributed as dist
from fastft.train.metrics import classification_metrics, write_confusion_matrix

__all__ = ["evaluate_classifier", "lm_eval", "loss_totals", "make_metrics_hook", "predict"]


@torch.no_grad()
def loss_totals(loss_mod, examples: list[dict], collate, device: torch.device, batch_size: int,
                max_batches: int = 0, shard: bool = False, per_example: bool = False) -> torch.Tensor:
    """(2,) float64 ``[sum of target losses, target count]`` of ``examples``.

    Args:
        loss_mod: ``(input_ids, attention_mask, labels, ..., smoothing=False) -> (loss sum, count)``
            (:class:`fastft.models.loss.CausalLMLoss`, or the classification loss).
        collate: examples -> batch dict of tensors.
        max_batches: stop after this many batches (0: all).
        shard: this rank takes its share of the examples and the totals are summed over ranks.
            Every rank runs the same number of batches (FSDP2 gathers weights in each forward):
            a short share is padded by wrapping (``dist.eval_shard``) and the padding entries
            carry no loss, so N ranks report what one does.
        per_example: ``labels`` are (B,) class ids (classification), not (B, T) token targets:
            padding rows are dropped instead of masked (DDP only; no collectives in the loop).
    """
    if shard:
        idx, n_real = dist.eval_shard(len(examples))
    else:
        idx = list(range(len(examples)))
        n_real = len(idx)
    starts = list(range(0, len(idx), batch_size))
    if max_batches:
        starts = starts[:max_batches]
    tot = torch.zeros(2, dtype=torch.float64)
    for s in starts:
        rows = [examples[i] for i in idx[s:s + batch_size]]
        pad = max(0, s + len(rows) - n_real)
        if pad and per_example:
            rows = rows[:len(rows) - pad]
            if not rows:
                continue
        b = {k: v.to(device) for k, v in collate(rows).items()}
        if pad and not per_example:
            b["labels"][len(rows) - pad:] = -100
        ls, n = loss_mod(**b, smoothing=False)
        tot += torch.tensor([float(ls), float(n)], dtype=torch.float64)
    if shard:
        dist.all_reduce_sum(tot)
    return tot


def lm_eval(loss_mod, examples: list[dict], collate, device: torch.device, batch_size: int,
            max_batches: int = 0, shard: bool = False, per_example: bool = False) -> dict:
    """``{"eval_loss", "eval_ppl", "eval_tokens"}`` of :func:`loss_totals` (loss 0 on no targets)."""
    tot = loss_totals(loss_mod, examples, collate, device, batch_size, max_batches, shard, per_example)
    loss = (tot[0] / tot[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(tot[1])}


def make_metrics_hook(bundle, run_dir: str | os.PathLike | None, pad_id: int, batch_size: int = 32):
    """The trainer's ``metrics_hook`` for a data bundle, or None when there is nothing to add.

    * classification (``bundle.label_names``): accuracy, precision, recall, macro_f1 on the
      validation split, the confusion matrix written to ``run_dir`` at every evaluation
      (``confusion_matrix.csv``/``.json``, the latest evaluation), and per task when mixed
      (``<task>/accuracy``...).
    * causal LM with several tasks (``bundle.tasks``): ``<task>/eval_loss`` and ``<task>/eval_ppl``.

    The hook has the trainer's signature ``(model, tokenizer, data, step) -> {name: float}``.
    """
    if bundle.label_names:
        def hook(model, tokenizer, data, step) -> dict:
            out = evaluate_classifier(model, data.validation, data.label_names, pad_id, batch_size, run_dir)
            out.pop("eval_loss")  # the trainer's own eval_loss is the same cross-entropy
            for name, examples in data.tasks.items():
                m = evaluate_classifier(model, examples, data.label_names, pad_id, batch_size)
                out.update({f"{name}/{k}": v for k, v in m.items()})
            return out

        return hook
    if not bundle.tasks:
        return None

    def lm_hook(model, tokenizer, data, step) -> dict:
        collate = data.collator if data.collator is not None else Collator(pad_id)
        loss_mod = CausalLMLoss(model, 0.0, fused_ce=False)
        device = next(model.parameters()).device
        out = {}
        for name, examples in data.tasks.items():
            rows = [{k: v for k, v in e.items() if k != "task"} for e in examples]
            m = lm_eval(loss_mod, rows, collate, device, batch_size)
            out[f"{name}/eval_loss"], out[f"{name}/eval_ppl"] = m["eval_loss"], m["eval_ppl"]
        return out

    return lm_hook


@torch.no_grad()
def predict(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 32) -> tuple[list[int], float]:
    """Predicted class ids and mean cross-entropy of ``examples`` (model in eval mode meanwhile)."""
    collate = Collator(pad_id)
    was_training = model.training
    model.eval()
    preds, total = [], 0.0
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            device = next(model.parameters()).device
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            total += nn.functional.cross_entropy(logits, batch["labels"].to(device), reduction="sum").item()
            preds += logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    return preds, total / max(1, len(examples))


def evaluate_classifier(model: nn.Module, examples: list[dict], label_names: Sequence[str], pad_id: int,
                        batch_size: int = 32, run_dir: str | None = None, prefix: str = "confusion_matrix") -> dict:
    """Metrics of ``model`` on ``examples``: ``eval_loss``, accuracy, precision, recall, macro_f1
    (all floats; the full dict with the confusion matrix goes to ``run_dir`` when given)."""
    preds, loss = predict(model, examples, pad_id, batch_size)
    m = classification_metrics([e["label"] for e in examples], preds, label_names)
    if run_dir:
        write_confusion_matrix(run_dir, m, prefix)
    return {"eval_loss": loss, **{k: m[k] for k in ("accuracy", "precision", "recall", "macro_f1")}}
