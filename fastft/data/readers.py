"""Read local data files into lists of row dicts.

Supported sources: ``.jsonl``/``.ndjson`` (one JSON object per line), ``.json`` (a list of
objects, or ``{"data": [...]}``-style dict holding one list), ``.csv``/``.tsv``, ``.parquet``,
and local Hugging Face ``datasets`` directories written by ``save_to_disk``.

Every problem is a :class:`fastft.errors.DataError` naming the file (and line where there
is one): a malformed JSON line is reported as ``file:line`` and either stops the read
(``on_bad_line="error"``, the default) or is skipped with a warning and a count
(``on_bad_line="skip"``) - never silently. Non-UTF-8 bytes name the line and byte offset.
Missing columns name the columns the file does have.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fastft.errors import DataError

log = logging.getLogger("fastft.data")

JSONL_EXT = (".jsonl", ".ndjson")
ON_BAD_LINE = ("error", "skip")


@dataclass
class ReadReport:
    """What a read did: rows kept and the ``file:line: problem`` strings of skipped lines."""

    path: str
    rows: int = 0
    skipped: list[str] = field(default_factory=list)


def _decode(path: str, raw: bytes) -> str:
    """Decode ``raw`` as UTF-8 (a leading BOM is dropped), naming line and byte on failure."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: bytes are not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}); re-encode the file as UTF-8") from None


def _read_jsonl(path: str, on_bad_line: str, report: ReadReport) -> list[dict]:
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    rows = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problem = f"{path}:{lineno}: bytes are not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            _bad_line(problem, on_bad_line, report)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            _bad_line(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})", on_bad_line, report)
            continue
        if not isinstance(obj, dict):
            _bad_line(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}", on_bad_line, report)
            continue
        rows.append(obj)
    return rows


SKIP_HINT = "set data.on_bad_line=skip to skip bad lines"  # fastft eval swaps in its own option's name


def _bad_line(problem: str, on_bad_line: str, report: ReadReport) -> None:
    if on_bad_line == "error":
        raise DataError(f"{problem} ({SKIP_HINT})")
    log.warning("skipping %s", problem)
    report.skipped.append(problem)


def _read_json(path: str) -> list[dict]:
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or a dict holding exactly one list), "
                            f"got a dict with keys {sorted(obj)}")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i} is {type(row).__name__}, expected a JSON object")
    return obj


def _read_csv(path: str) -> list[dict]:
    with open(path, "rb") as f:
        text = _decode(path, f.read())
    delimiter = "\t" if path.endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    for row in reader:
        if None in row:  # more fields than header columns
            raise DataError(f"{path}:{reader.line_num}: row has more fields than the header "
                            f"({len(reader.fieldnames or [])} columns)")
        rows.append(dict(row))
    return rows


def _optional(module: str, path: str, what: str):
    """Import a reader library of the ``data`` extra, or a one-line DataError saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading {what} needs the `{module.split('.')[0]}` package "
                        "(pip install 'fastft[data]')") from None


def _read_parquet(path: str) -> list[dict]:
    pq = _optional("pyarrow.parquet", path, "Parquet files")

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({type(e).__name__}: {e})") from None
    return table.to_pylist()


def _read_hf_dir(path: str, split: str | None) -> list[dict]:
    datasets = _optional("datasets", path, "`datasets` directories")

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: not a `datasets` directory saved with save_to_disk "
                        f"({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else None)
        if name not in ds:
            raise DataError(f"{path}: split {split!r} not found; the directory has splits {sorted(ds)}")
        ds = ds[name]
    return ds.to_list()


def read_records(path: str, *, on_bad_line: str = "error", split: str | None = None,
                 report: ReadReport | None = None) -> list[dict]:
    """Read one local file or ``datasets`` directory into a list of row dicts.

    Args:
        path: file (``.jsonl``, ``.ndjson``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``) or directory.
        on_bad_line: ``"error"`` stops at the first malformed JSONL line, ``"skip"`` skips it with a
            warning and records it in ``report.skipped``.
        split: for a ``DatasetDict`` directory, the split to read (default ``train``); also given
            as ``path="<dir>::<split>"``, which is how config keys name a split.
        report: filled with row and skip counts when given.

    Raises:
        DataError: missing path, unknown extension, malformed content, non-UTF-8 bytes.
    """
    if split is None and "::" in path and os.path.isdir(path.rsplit("::", 1)[0]):
        path, split = path.rsplit("::", 1)  # "dataset_dir::validation" picks a DatasetDict split
    if on_bad_line not in ON_BAD_LINE:
        raise DataError(f"on_bad_line={on_bad_line!r}: expected one of {', '.join(ON_BAD_LINE)}")
    report = report if report is not None else ReadReport(path)
    report.path = path
    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    lower = path.lower()
    if os.path.isdir(path):
        rows = _read_hf_dir(path, split)
    elif lower.endswith(JSONL_EXT):
        rows = _read_jsonl(path, on_bad_line, report)
    elif lower.endswith(".json"):
        rows = _read_json(path)
    elif lower.endswith((".csv", ".tsv")):
        rows = _read_csv(path)
    elif lower.endswith(".parquet"):
        rows = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown data file type; expected .jsonl, .json, .csv, .tsv, .parquet "
                        "or a `datasets` directory")
    report.rows = len(rows)
    if report.skipped:
        log.warning("%s: skipped %d malformed line(s), kept %d rows", path, len(report.skipped), len(rows))
    return rows


def map_columns(rows: list[dict], mapping: Mapping[str, str] | None, path: str) -> list[dict]:
    """Rename source columns to the names fastft expects.

    Args:
        mapping: ``{fastft_name: column_in_file}``, e.g. ``{"text": "review", "label": "stars"}``.
            Columns not mentioned keep their names.

    Raises:
        DataError: a mapped column does not exist (the message lists the columns that do).
    """
    if not mapping or not rows:
        return rows
    existing = _columns(rows)
    missing = [src for src in mapping.values() if src not in existing]
    if missing:
        raise DataError(f"{path}: column(s) {missing} in data.columns not found; the file has columns "
                        f"{sorted(existing)}")
    inverse = {src: dst for dst, src in mapping.items()}
    return [{inverse.get(k, k): v for k, v in row.items()} for row in rows]


def _columns(rows: Iterable[dict]) -> set[str]:
    cols: set[str] = set()
    for row in rows:
        cols.update(row)
    return cols


def require_columns(rows: list[dict], required: Iterable[str], path: str, fmt: str,
                    allow_null: bool = False) -> None:
    """Check that every row has ``required`` columns (with ``allow_null``, a null value passes:
    cleaning drops such rows with ``data.drop_empty`` and counts them).

    Raises:
        DataError: naming the first missing column, the row, and the columns that exist; or the
            first null value, the row, and how to drop such rows.
    """
    required = list(required)
    for i, row in enumerate(rows):
        nulls = [c for c in required if c in row and row[c] is None]
        if nulls and not allow_null:  # the column exists: saying it is missing sent users hunting
            raise DataError(f"{path}: row {i}: column(s) {nulls} are null; fill them, or drop such rows with "
                            "data.drop_empty=true")
        missing = [c for c in required if c not in row]
        if missing:
            raise DataError(f"{path}: row {i}: format {fmt!r} needs column(s) {missing}; the data has "
                            f"columns {sorted(_columns(rows))} (map yours with data.columns)")
