"""Classification metrics: accuracy, per-class and macro precision/recall/F1, confusion matrix.

Pure Python over integer class ids (a few thousand predictions at most here), no sklearn.
A class that is never predicted has precision 0 (sklearn's ``zero_division=0``), so macro
averages are not inflated by empty classes.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Sequence


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> list[list[int]]:
    """``m[t][p]`` = number of examples of true class ``t`` predicted as ``p``."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
    m = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred):
        m[int(t)][int(p)] += 1
    return m


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           label_names: Sequence[str]) -> dict:
    """Accuracy, macro precision/recall/F1, per-class P/R/F1/support and the confusion matrix.

    Returns:
        ``{"accuracy", "precision", "recall", "macro_f1", "per_class": {name: {...}},
        "confusion_matrix": [[...]], "labels": [...], "n"}``; floats in [0, 1].
    """
    k = len(label_names)
    m = confusion_matrix(y_true, y_pred, k)
    n = len(y_true)
    per_class = {}
    ps, rs, fs = [], [], []
    for c, name in enumerate(label_names):
        tp = m[c][c]
        predicted = sum(m[t][c] for t in range(k))
        actual = sum(m[c])
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": f, "support": actual}
        ps.append(p)
        rs.append(r)
        fs.append(f)
    return {
        "accuracy": sum(m[c][c] for c in range(k)) / n if n else 0.0,
        "precision": sum(ps) / k if k else 0.0,
        "recall": sum(rs) / k if k else 0.0,
        "macro_f1": sum(fs) / k if k else 0.0,
        "per_class": per_class,
        "confusion_matrix": m,
        "labels": list(label_names),
        "n": n,
    }


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_confusion_matrix(run_dir: str | os.PathLike, metrics: dict, prefix: str = "confusion_matrix") -> list[Path]:
    """Write ``<prefix>.csv`` (rows = true class, columns = predicted) and ``<prefix>.json``
    (the full metrics dict) into ``run_dir`` atomically. Returns the paths."""
    names = metrics["labels"]
    lines = ["true\\pred," + ",".join(names)]
    lines += [f"{name}," + ",".join(str(v) for v in row) for name, row in zip(names, metrics["confusion_matrix"])]
    csv_path = Path(run_dir) / f"{prefix}.csv"
    json_path = Path(run_dir) / f"{prefix}.json"
    atomic_write(csv_path, "\n".join(lines) + "\n")
    atomic_write(json_path, json.dumps(metrics, indent=1) + "\n")
    return [csv_path, json_path]


def format_metrics(metrics: dict) -> str:
    """One line: ``accuracy=0.912 precision=0.905 recall=0.910 macro_f1=0.907 (n=36)``."""
    keys = ("accuracy", "precision", "recall", "macro_f1")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys) + f" (n={metrics['n']})"
