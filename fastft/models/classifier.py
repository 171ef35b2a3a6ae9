"""Sequence classification models: ``AutoModelForSequenceClassification`` with a new head over a
pretrained backbone, and its loss. (The rows: :mod:`fastft.data.classification`; the evaluation:
:func:`fastft.train.evaluation.evaluate_classifier`.)

The backbone is an encoder such as MiniLM/BERT, or a decoder such as Llama, which classifies from
the last non-pad token. Parameters the checkpoint does not have (the new head, and e.g. BERT's
pooler when the checkpoint lacks it) are reported by ``from_pretrained`` as missing:
:func:`load_classifier` returns their names so they are trained in every fine-tuning mode, LoRA
included.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fastft.errors import UserError
from fastft.models.loading import load_tokenizer, materialize, resolve_package_path

__all__ = ["ClassificationLoss", "load_classifier", "mark_trainable"]


def load_classifier(path: str, label_names: Sequence[str], dtype: torch.dtype = torch.float32,
                    gguf_file: str | None = None, attn_implementation: str | None = None):
    """Load ``AutoModelForSequenceClassification`` with a new ``len(label_names)``-way head.

    Args:
        path: local HF folder, ``.gguf``/hub id (see ``fastft.models.loading``) or ``pkg:<package>/<dir>``.

    Returns:
        (model, tokenizer, new_param_names) where ``new_param_names`` are the parameters that the
        checkpoint did not provide (the head; train them in every mode).
    """
    from transformers import AutoModelForSequenceClassification  # transformers loads on first use

    folder = materialize(resolve_package_path(path), gguf_file)
    tokenizer = load_tokenizer(folder)
    kwargs: dict = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                    "label2id": {n: i for i, n in enumerate(label_names)}, "dtype": dtype,
                    "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path={path!r}: cannot load a sequence-classification model from {folder} "
                        f"({str(e).splitlines()[0]})") from None
    if model.config.pad_token_id is None:
        # Decoder classifiers pool the last non-pad token; they need to know which id is padding.
        model.config.pad_token_id = tokenizer.pad_token_id
    new = sorted(info.get("missing_keys", []))
    return model, tokenizer, new


def mark_trainable(model: nn.Module, names: Sequence[str]) -> int:
    """Make the parameters whose name ends with one of ``names`` trainable (call after freezing or
    LoRA injection, which may wrap names with a prefix). Returns how many were found."""
    found = 0
    for n, p in model.named_parameters():
        if any(n == k or n.endswith("." + k) for k in names):
            p.requires_grad_(True)
            found += 1
    return found


class ClassificationLoss(nn.Module):
    """``forward`` returns (sum of per-example cross-entropy, number of examples), the same
    contract as the causal-LM loss, so the trainer normalises over the whole optimizer step.

    Args (forward):
        input_ids, attention_mask: ``(B, T)`` int64; labels: ``(B,)`` int64 class ids.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                smoothing: bool = True, **_: Any):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, K)
        ls = self.label_smoothing if smoothing else 0.0
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=ls)
        return loss, torch.tensor(labels.shape[0])
