"""Readers, column mapping, splits and cleaning: every format round-trips, every bad input is a
one-line DataError naming the file (and line) and what exists."""
from __future__ import annotations

import json
import logging

import pytest

from fastft.data.cleaning import CleanReport, clean_rows
from fastft.data.readers import ReadReport, map_columns, read_records, require_columns
from fastft.errors import DataError

ROWS = [{"text": "good movie", "label": "positive"}, {"text": "bad, very bad", "label": "negative"},
        {"text": "it is blue", "label": "neutral"}]


def _write(path, text: str | bytes):
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(path, mode) as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_dict", "csv", "tsv", "parquet", "hf_dir", "hf_dict"])
def test_every_source_round_trips(tmp_path, kind):
    if kind == "jsonl":
        p = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    elif kind == "json":
        p = _write(tmp_path / "d.json", json.dumps(ROWS))
    elif kind == "json_dict":
        p = _write(tmp_path / "d.json", json.dumps({"version": 1, "data": ROWS}))
    elif kind in ("csv", "tsv"):
        sep = "," if kind == "csv" else "\t"
        body = f"text{sep}label\n" + "".join(
            (f'"{r["text"]}"' if sep in r["text"] else r["text"]) + f"{sep}{r['label']}\n" for r in ROWS)
        p = _write(tmp_path / f"d.{kind}", body)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = str(tmp_path / "d.parquet")
        pq.write_table(pa.Table.from_pylist(ROWS), p)
    else:
        import datasets

        ds = datasets.Dataset.from_list(ROWS)
        if kind == "hf_dict":
            ds = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
        p = str(tmp_path / "hf")
        ds.save_to_disk(p)
    assert read_records(p) == ROWS
    if kind == "hf_dict":
        assert read_records(p + "::test") == ROWS[:1] == read_records(p, split="test")
        with pytest.raises(DataError, match=r"split 'dev' not found; the directory has splits \['test', 'train'\]"):
            read_records(p + "::dev")


def test_malformed_json_line_stops_with_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON") as e:
        read_records(p)
    assert "\n" not in str(e.value)


def test_malformed_json_line_skipped_with_warning_and_count(tmp_path, caplog):
    p = _write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"\n[1, 2]\n{"text": "c"}\n')
    report = ReadReport(p)
    with caplog.at_level(logging.WARNING, logger="fastft.data"):
        rows = read_records(p, on_bad_line="skip", report=report)
    assert rows == [{"text": "a"}, {"text": "c"}]
    assert len(report.skipped) == 2 and report.skipped[0].startswith(f"{p}:2:") and f"{p}:3:" in report.skipped[1]
    assert "skipped 2 malformed line(s)" in caplog.text


def test_non_utf8_bytes_name_the_line(tmp_path):
    p = _write(tmp_path / "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: bytes are not valid UTF-8 \(byte 0xe9"):
        read_records(p)
    c = _write(tmp_path / "latin.csv", b"text,label\nfine,positive\ncaf\xe9,neutral\n")
    with pytest.raises(DataError, match=r"latin\.csv:3: bytes are not valid UTF-8"):
        read_records(c)


def test_missing_file_unknown_type_and_bad_flag(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown data file type"):
        read_records(_write(tmp_path / "d.txt", "hello"))
    with pytest.raises(DataError, match="on_bad_line='maybe'"):
        read_records(_write(tmp_path / "d.jsonl", "{}"), on_bad_line="maybe")
    with pytest.raises(DataError, match=r"d2\.json:1: malformed JSON"):
        read_records(_write(tmp_path / "d2.json", "[{"))
    with pytest.raises(DataError, match="more fields than the header"):
        read_records(_write(tmp_path / "d.csv", "a,b\n1,2,3\n"))


def test_column_mapping_and_missing_columns_name_existing_ones():
    rows = [{"review": "nice", "stars": "positive"}]
    assert map_columns(rows, {"text": "review", "label": "stars"}, "f.csv") == [{"text": "nice", "label": "positive"}]
    with pytest.raises(DataError, match=r"column\(s\) \['body'\].*has columns \['review', 'stars'\]"):
        map_columns(rows, {"text": "body"}, "f.csv")
    with pytest.raises(DataError, match=r"f\.csv: row 0: format 'classification' needs column\(s\) \['text', 'label'\]"
                                        r"; the data has columns \['review', 'stars'\]"):
        require_columns(rows, ["text", "label"], "f.csv", "classification")


def test_cleaning_counts_each_step():
    rows = [{"text": "  Hello   World \n", "label": "a"}, {"text": "hello world", "label": "a"},
            {"text": "   ", "label": "b"}, {"text": "Other\tTEXT", "label": "b"},
            {"messages": [{"role": "user", "content": "  Hi  "}]}]
    report = CleanReport()
    out = clean_rows(rows[:4], ["text", "label"], normalise_whitespace=True, lowercase=True,
                     drop_duplicates=True, report=report)
    assert [r["text"] for r in out] == ["hello world", "other text"]
    assert (report.rows_in, report.rows_out, report.dropped_empty, report.dropped_duplicates) == (4, 2, 1, 1)
    assert report.whitespace_normalised == 3 and report.lowercased == 2
    assert "dropped_duplicates=1" in report.summary()
    chat = clean_rows(rows[4:], ["messages"], report=CleanReport())
    assert chat[0]["messages"][0]["content"] == "Hi" and rows[4]["messages"][0]["content"] == "  Hi  "
    # Only required fields count as empty: an empty alpaca "input" is fine, an empty "output" is not.
    r = clean_rows([{"instruction": "x", "input": "", "output": "y"}, {"instruction": "x", "input": "", "output": " "}],
                   ["instruction", "input", "output"], required_fields=["instruction", "output"])
    assert len(r) == 1
