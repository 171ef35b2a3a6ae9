"""Sequence classification: ``text``/``label`` rows -> ``input_ids`` + int ``label``, a model with
a new head, its loss and its evaluation.

Labels may be strings or integers. The label set comes from the training split (or
``data.label_names``, which fixes the order); integer labels sort numerically, strings
alphabetically. A validation/test label the training split never had is an error naming the
file, row and the known labels: the head has no output for it.

The model is ``AutoModelForSequenceClassification`` over the pretrained backbone (encoder such as
MiniLM/BERT, or a decoder such as Llama, which classifies from the last non-pad token). Parameters
the checkpoint does not have (the new head, and e.g. BERT's pooler when the checkpoint lacks it)
are reported by ``from_pretrained`` as missing: :func:`load_classifier` returns their names so they
are trained in every fine-tuning mode, LoRA included.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fastft.errors import DataError
from fastft.metrics import classification_metrics, write_confusion_matrix
from fastft.model_loading import resolve_package_path  # noqa: F401  (callers import it from here too)

EXCESS_LENGTH = ("truncate", "drop", "error")


def _key(label: Any) -> str:
    if isinstance(label, bool) or not isinstance(label, (str, int)) and not (
            isinstance(label, float) and label.is_integer()):
        raise DataError(f"label {label!r}: expected a string or an integer")
    return str(int(label)) if isinstance(label, float) else str(label).strip()


def label_names_from(train_rows: list[dict], given: Sequence[str] = (), source: str = "train") -> list[str]:
    """Ordered class names: ``given`` if set, else the training labels (ints numerically)."""
    keys = {_key(r["label"]) for r in train_rows}
    if given:
        names = [str(g) for g in given]
        if len(set(names)) != len(names):
            raise DataError(f"data.label_names={names}: names must be unique")
        extra = sorted(keys - set(names))
        if extra:
            raise DataError(f"{source}: label(s) {extra} are not in data.label_names={names}")
        return names
    if len(keys) < 2:
        raise DataError(f"{source}: classification needs at least 2 distinct labels, found {sorted(keys)}")
    if all(k.lstrip("-").isdigit() for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def encode_labels(rows: list[dict], names: Sequence[str], source: str) -> list[int]:
    """Class ids of ``rows``; DataError for a label not in ``names`` (unseen in training)."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, r in enumerate(rows):
        k = _key(r["label"])
        if k not in index:
            raise DataError(f"{source}: row {i}: label {k!r} was not seen in training "
                            f"(known labels: {', '.join(names)})")
        out.append(index[k])
    return out


def encode_classification(rows: list[dict], tokenizer: Any, names: Sequence[str], max_length: int,
                          excess_length: str = "truncate", source: str = "data") -> tuple[list[dict], dict]:
    """Tokenise ``text`` (batched, with the tokenizer's special tokens, e.g. BERT's [CLS]/[SEP]).

    Returns:
        (examples ``{"input_ids": list[int], "label": int}``, counts ``{"truncated", "dropped_too_long"}``).

    Raises:
        DataError: empty text, unseen label, or a too-long text with ``excess_length="error"``.
    """
    if excess_length not in EXCESS_LENGTH:
        raise DataError(f"data.excess_length={excess_length!r}: expected one of {', '.join(EXCESS_LENGTH)}")
    for i, r in enumerate(rows):
        if not str(r["text"]).strip():
            raise DataError(f"{source}: row {i}: empty text (set data.drop_empty=true to drop such rows)")
    labels = encode_labels(rows, names, source)
    texts = [str(r["text"]) for r in rows]
    ids = tokenizer(texts)["input_ids"] if texts else []
    counts = {"truncated": 0, "dropped_too_long": 0}
    long_rows = [i for i, x in enumerate(ids) if len(x) > max_length]
    if long_rows and excess_length == "error":
        i = long_rows[0]
        raise DataError(f"{source}: row {i} has {len(ids[i])} tokens > data.max_length={max_length} "
                        "(set data.excess_length to truncate or drop)")
    if long_rows and excess_length == "truncate":
        # Re-tokenise with truncation so special tokens at the end ([SEP]) are kept.
        cut = tokenizer([texts[i] for i in long_rows], truncation=True, max_length=max_length)["input_ids"]
        for i, x in zip(long_rows, cut):
            ids[i] = x
        counts["truncated"] = len(long_rows)
    drop = set(long_rows) if excess_length == "drop" else set()
    counts["dropped_too_long"] = len(drop)
    examples = [{"input_ids": list(x), "label": y} for i, (x, y) in enumerate(zip(ids, labels)) if i not in drop]
    return examples, counts


def load_classifier(path: str, label_names: Sequence[str], dtype: torch.dtype = torch.float32,
                    gguf_file: str | None = None, attn_implementation: str | None = None):
    """Load ``AutoModelForSequenceClassification`` with a new ``len(label_names)``-way head.

    Args:
        path: local HF folder, ``.gguf``/hub id (see ``fastft.model_loading``) or ``pkg:<package>/<dir>``.

    Returns:
        (model, tokenizer, new_param_names) where ``new_param_names`` are the parameters that the
        checkpoint did not provide (the head; train them in every mode).
    """
    from transformers import AutoModelForSequenceClassification

    from fastft.errors import UserError
    from fastft.model_loading import load_tokenizer, materialize

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


@torch.no_grad()
def predict(model: nn.Module, examples: list[dict], pad_id: int, batch_size: int = 32) -> tuple[list[int], float]:
    """Predicted class ids and mean cross-entropy of ``examples`` (model in eval mode meanwhile)."""
    from fastft.data.collate import Collator

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
