"""Sequence classification data: ``text``/``label`` rows -> ``input_ids`` + int ``label``. The model
with its new head and its loss are :mod:`fastft.models.classifier`; its evaluation is
:func:`fastft.train.evaluation.evaluate_classifier`.

Labels may be strings or integers. The label set comes from the training split (or
``data.label_names``, which fixes the order); integer labels sort numerically, strings
alphabetically. A validation/test label the training split never had is an error naming the
file, row and the known labels: the head has no output for it.

"""
from __future__ import annotations

from typing import Any, Sequence

from fastft.errors import DataError

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
