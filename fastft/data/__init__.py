"""Datasets for training: ``build_datasets(data_cfg, tokenizer, seed) -> DataBundle``.

Every example is a dict with ``input_ids`` and ``labels`` lists (labels -100 where masked), or
``input_ids`` and an int ``label`` for classification; ``fastft.data.collate.Collator`` pads them.
The trainer does not care which format produced the rows.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from fastft.errors import DataError

BUNDLED = Path(__file__).resolve().parent.parent / "resources" / "data"


@dataclass
class DataBundle:
    train: list[dict]
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    tasks: dict[str, list[dict]] = field(default_factory=dict)  # per-task validation subsets
    stats: dict[str, int] = field(default_factory=dict)


def default_train_file() -> str:
    return str(BUNDLED / "instructions.jsonl")


def split(examples: list, val_ratio: float, seed: int) -> tuple[list, list]:
    """Shuffle a copy with ``seed`` and hold out ``round(len * val_ratio)`` examples (at least 1
    when val_ratio > 0 and there are 2+ examples)."""
    if val_ratio <= 0 or len(examples) < 2:
        return list(examples), []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_val = min(len(idx) - 1, max(1, round(len(idx) * val_ratio)))
    return [examples[i] for i in idx[n_val:]], [examples[i] for i in idx[:n_val]]


def build_datasets(data_cfg, tokenizer, seed: int = 0) -> DataBundle:
    """Load, tokenise and split the data described by the ``data`` config section."""
    from fastft.data.instruction import load_instruction_file

    if data_cfg.format != "instruction":
        raise DataError(f"data.format={data_cfg.format!r} is not supported by this build")
    train_file = data_cfg.train_file or default_train_file()
    kw = dict(tokenizer=tokenizer, max_length=data_cfg.max_length, train_on_inputs=data_cfg.train_on_inputs)
    train, dropped = load_instruction_file(train_file, **kw)
    stats = {"dropped_no_target": dropped}
    if data_cfg.validation_file:
        validation, d = load_instruction_file(data_cfg.validation_file, **kw)
        stats["dropped_no_target"] += d
    else:
        train, validation = split(train, data_cfg.val_ratio, seed)
    test = load_instruction_file(data_cfg.test_file, **kw)[0] if data_cfg.test_file else []
    if not train:
        raise DataError(f"data.train_file={train_file!r}: no training examples (empty file, or every "
                        "response truncated away by data.max_length)")
    stats.update(train=len(train), validation=len(validation), test=len(test))
    return DataBundle(train=train, validation=validation, test=test, stats=stats)
