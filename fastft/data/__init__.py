"""Datasets for training: ``build_datasets(data_cfg, tokenizer, seed) -> DataBundle``.

Every example is a dict with ``input_ids`` and ``labels`` lists (labels -100 where masked), or
``input_ids`` and an int ``label`` for classification; ``fastft.data.collate.Collator`` pads them.
The trainer does not care which format produced the rows.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastft.errors import DataError

BUNDLED = Path(__file__).resolve().parent.parent / "resources" / "data"
log = logging.getLogger("fastft.data")

# format -> (text fields cleaned, fields that must be non-empty)
FIELDS = {
    "instruction": (("instruction", "input", "output"), ("instruction", "output")),
    "chat": (("messages",), ("messages",)),
    "prompt_completion": (("prompt", "completion"), ("prompt", "completion")),
    "text": (("text",), ("text",)),
    "classification": (("text",), ("text", "label")),
}


@dataclass
class DataBundle:
    train: list[dict]
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    tasks: dict[str, list[dict]] = field(default_factory=dict)  # per-task validation subsets
    stats: dict[str, int] = field(default_factory=dict)
    label_names: list[str] = field(default_factory=list)  # classification: class id -> name
    collator: object | None = None  # set when the rows need their own (packing: per-sample position ids)


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


def _pairs(items: list[str], key: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}``; ConfigError naming ``key`` otherwise."""
    from fastft.errors import ConfigError

    out = {}
    for item in items or []:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{key}: entry {item!r} must look like name=value")
        if name.strip() in out:
            raise ConfigError(f"{key}: {name.strip()!r} given twice")
        out[name.strip()] = value.strip()
    return out


def _weights(items: list[str]) -> dict[str, float] | None:
    from fastft.errors import ConfigError

    out = {}
    for name, value in _pairs(items, "data.mix_weights").items():
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"data.mix_weights: {name}={value!r} is not a number") from None
    return out or None


# Rows read by :func:`preflight` (before the model load), handed to the first :func:`_read_rows`
# of the same file so a file is parsed once. Keyed by what the rows depend on; popped on use.
_PREFLIGHT: dict[tuple, tuple[list[dict], Counter]] = {}


def _rows_key(path: str, fmt: str, data_cfg) -> tuple | None:
    try:
        st = Path(path.rsplit("::", 1)[0] if "::" in path else path).stat()
    except OSError:
        return None
    settings = tuple(repr(getattr(data_cfg, k, None)) for k in (
        "columns", "on_bad_line", "strip", "normalize_whitespace", "lowercase", "drop_empty", "drop_duplicates"))
    return (path, st.st_mtime_ns, st.st_size, fmt, settings)


def data_files(data_cfg) -> list[tuple[str, str]]:
    """Every data file the ``data`` section names, as (config key, path); the bundled default
    training file when ``train_file`` is empty."""
    fmt = data_cfg.format
    default = str(BUNDLED / "sentiment.jsonl") if fmt == "classification" else default_train_file()
    files = [("data.train_file", data_cfg.train_file or default)]
    files += [(f"data.tasks {name}", path) for name, path in _pairs(data_cfg.tasks, "data.tasks").items()]
    files += [(f"data.{k}", getattr(data_cfg, k)) for k in ("validation_file", "test_file") if getattr(data_cfg, k)]
    return files


def preflight(data_cfg) -> None:
    """Read, parse and column-check every data file before anything expensive (the model load).

    A missing file, a directory that is not a ``datasets`` folder, malformed JSON on line N or a
    missing column raise the same one-line :class:`DataError` that loading would raise later,
    seconds into the run instead of after a 20 s model load. The parsed rows are kept for the
    tokenising pass, so each file is still read once.
    """
    if data_cfg.format not in FIELDS:
        raise DataError(f"data.format={data_cfg.format!r}: expected one of {', '.join(FIELDS)}")
    _PREFLIGHT.clear()
    for key, path in data_files(data_cfg):
        if not Path(path.rsplit("::", 1)[0] if "::" in path else path).exists():
            raise DataError(f"{key}={path!r}: file not found")
        report: Counter = Counter()
        rows = _read_rows(path, data_cfg.format, data_cfg, report)
        key = _rows_key(path, data_cfg.format, data_cfg)
        if key is not None:
            _PREFLIGHT[key] = (rows, report)


def _read_rows(path: str, fmt: str, data_cfg, report: Counter) -> list[dict]:
    """Read, map columns, check required columns, clean. Counts go into ``report``."""
    key = _rows_key(path, fmt, data_cfg)
    if key in _PREFLIGHT:
        rows, counts = _PREFLIGHT.pop(key)
        report.update(counts)
        return [dict(r) for r in rows]
    from fastft.data.cleaning import CleanReport, clean_rows
    from fastft.data.readers import ReadReport, map_columns, read_records, require_columns

    rr = ReadReport(path)
    rows = read_records(path, on_bad_line=data_cfg.on_bad_line, report=rr)
    rows = map_columns(rows, _pairs(data_cfg.columns, "data.columns"), path)
    text_fields, required = FIELDS[fmt]
    if rows:
        require_columns(rows, required, path, fmt, allow_null=data_cfg.drop_empty)
    cr = CleanReport()
    rows = clean_rows(rows, text_fields, strip=data_cfg.strip, normalise_whitespace=data_cfg.normalize_whitespace,
                      lowercase=data_cfg.lowercase, drop_empty=data_cfg.drop_empty,
                      drop_duplicates=data_cfg.drop_duplicates, required_fields=required, report=cr)
    report.update({"skipped_bad_lines": len(rr.skipped), "dropped_empty": cr.dropped_empty,
                   "dropped_duplicates": cr.dropped_duplicates})
    return rows


def _encode(rows: list[dict], path: str, fmt: str, tokenizer, data_cfg, label_names: list[str]):
    """Tokenise rows of one file; returns (examples, counts)."""
    from fastft.data.chat import apply_excess_length, encode_rows

    if fmt == "classification":
        from fastft.data.classification import encode_classification

        return encode_classification(rows, tokenizer, label_names, data_cfg.max_length, data_cfg.excess_length, path)
    if fmt == "instruction":
        from fastft.data.instruction import tokenize_row

        # No truncation here: apply_excess_length truncates/drops/errors and counts.
        examples = [tokenize_row(r, tokenizer, 1 << 30, data_cfg.train_on_inputs) for r in rows]
    else:
        examples = encode_rows(rows, fmt, tokenizer, train_on_inputs=data_cfg.train_on_inputs,
                               chat_template=data_cfg.chat_template or None, source=path)
    return apply_excess_length(examples, data_cfg.max_length, data_cfg.excess_length, path)


def load_file(path: str, fmt: str, tokenizer, data_cfg, label_names: list[str] | None = None) -> tuple[list[dict], dict]:
    """Examples of one data file (read, cleaned, tokenised, length-checked), through the on-disk
    cache when ``data_cfg.cache``. Returns (examples, counts of what was skipped/dropped/truncated)."""
    from fastft.data.cache import cache_key, cached

    def build():
        report: Counter = Counter()
        rows = _read_rows(path, fmt, data_cfg, report)
        examples, counts = _encode(rows, path, fmt, tokenizer, data_cfg, label_names or [])
        report.update(counts)
        return examples, dict(report)

    settings = {k: getattr(data_cfg, k) for k in ("max_length", "train_on_inputs", "columns", "on_bad_line",
                                                  "excess_length", "chat_template", "strip", "normalize_whitespace",
                                                  "lowercase", "drop_empty", "drop_duplicates")}
    settings.update(format=fmt, label_names=list(label_names or []))
    if data_cfg.chat_template and Path(data_cfg.chat_template).is_file():
        settings["chat_template"] = Path(data_cfg.chat_template).read_text()
    if data_cfg.cache:
        key = cache_key([path], tokenizer, settings)
        examples, info, _ = cached(key, build)
    else:
        examples, info = build()
    return examples, info


def _classification_labels(files: list[str], data_cfg) -> list[str]:
    from fastft.data.classification import label_names_from

    rows = [r for f in files for r in _read_rows(f, "classification", data_cfg, Counter())]
    return label_names_from(rows, data_cfg.label_names, ", ".join(files))


def build_datasets(data_cfg, tokenizer, seed: int = 0) -> DataBundle:
    """Load, clean, tokenise, split, mix and pack the data described by the ``data`` config section.

    ``train_file`` is task ``main``; ``data.tasks`` adds more (``name=path``), mixed by
    ``mix_weights`` or ``mix_temperature``; each task's validation split is kept in
    ``DataBundle.tasks`` for per-task metrics (``validation`` is their union).
    """
    from fastft.data.mixing import mix_tasks, tag_task

    fmt = data_cfg.format
    if fmt not in FIELDS:
        raise DataError(f"data.format={fmt!r}: expected one of {', '.join(FIELDS)}")
    if data_cfg.packing and fmt == "classification":
        from fastft.errors import ConfigError

        raise ConfigError("data.packing=true: packing applies to token formats, not classification")
    default = str(BUNDLED / "sentiment.jsonl") if fmt == "classification" else default_train_file()
    train_file = data_cfg.train_file or default
    files = {"main": train_file, **_pairs(data_cfg.tasks, "data.tasks")}
    label_names = _classification_labels(list(files.values()), data_cfg) if fmt == "classification" else []
    stats: Counter = Counter()

    def load(path: str) -> list[dict]:
        examples, counts = load_file(path, fmt, tokenizer, data_cfg, label_names)
        stats.update(counts)
        return examples

    trains, vals = {}, {}
    test: list[dict] = []
    for name, path in files.items():
        examples = load(path)
        if name == "main" and data_cfg.test_file:
            test = load(data_cfg.test_file)
        elif name == "main" and data_cfg.test_ratio > 0:
            examples, test = split(examples, data_cfg.test_ratio, seed + 1)
        if name == "main" and data_cfg.validation_file:
            vals[name] = load(data_cfg.validation_file)
        else:
            examples, vals[name] = split(examples, data_cfg.val_ratio, seed)
        if not examples:
            raise DataError(f"data file {path!r}: no training examples (empty file, or every row dropped: "
                            f"{ {k: v for k, v in stats.items() if v} or 'none'}; see data.max_length / data.excess_length)")
        trains[name] = examples
    if len(files) == 1:
        train, validation, tasks = trains["main"], vals["main"], {}
    else:
        train = mix_tasks(trains, weights=_weights(data_cfg.mix_weights), temperature=data_cfg.mix_temperature,
                          seed=seed)
        tasks = {name: tag_task(v, name) for name, v in vals.items()}
        validation = [e for v in tasks.values() for e in v]
        stats.update({f"train_{name}": sum(e["task"] == name for e in train) for name in trains})
    collator = None
    if data_cfg.packing:
        from fastft.data.packing import pack_examples

        from fastft.data.packing import PackedCollator

        stats["packed_samples"] = len(train)
        train = pack_examples(train, data_cfg.max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        collator = PackedCollator(pad)
    _PREFLIGHT.clear()  # rows a cache hit did not need
    stats.update(train=len(train), validation=len(validation), test=len(test))
    noisy = {k: v for k, v in stats.items() if v and k in ("skipped_bad_lines", "dropped_empty", "dropped_duplicates",
                                                           "truncated", "dropped_too_long", "dropped_no_target")}
    if noisy:
        log.warning("data: %s", ", ".join(f"{k}={v}" for k, v in noisy.items()))
    return DataBundle(train=train, validation=validation, test=test, tasks=tasks, stats=dict(stats),
                      label_names=label_names, collator=collator)
