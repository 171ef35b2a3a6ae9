"""Tokenisation cache (keyed by data + tokenizer + template + settings, atomic) and multitask mixing."""
from __future__ import annotations

import os

import pytest

from _data_util import tiny_tokenizer
from fastft.data.cache import cache_key, cached, load_examples, save_examples
from fastft.data.mixing import mix_tasks, mixing_probabilities
from fastft.errors import DataError


def test_cache_round_trip_and_hit(tmp_path):
    exs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]},
           {"input_ids": [], "labels": []}]
    calls = []

    def build():
        calls.append(1)
        return exs, {"truncated": 2}

    a = cached("k1", build, tmp_path)
    b = cached("k1", build, tmp_path)
    assert a == (exs, {"truncated": 2}, False) and b == (exs, {"truncated": 2}, True) and len(calls) == 1
    assert os.listdir(tmp_path) == ["k1.npz"]  # no temp file left behind
    cls = [{"input_ids": [5, 6], "label": 2, "task": "sent"}]
    save_examples(tmp_path / "c.npz", cls, {})
    assert load_examples(tmp_path / "c.npz") == (cls, {})


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    (tmp_path / "k.npz").write_bytes(b"not a zip")
    out = cached("k", lambda: ([{"input_ids": [1], "labels": [1]}], {}), tmp_path)
    assert out[2] is False and load_examples(tmp_path / "k.npz")[0] == [{"input_ids": [1], "labels": [1]}]


def test_cache_key_depends_on_data_tokenizer_template_and_settings(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n')
    tok = tiny_tokenizer()
    base = cache_key([str(f)], tok, {"format": "text", "max_length": 64})
    assert base == cache_key([str(f)], tok, {"max_length": 64, "format": "text"})
    assert base != cache_key([str(f)], tok, {"format": "text", "max_length": 65})
    assert base != cache_key([str(f)], tiny_tokenizer(chat_template=False), {"format": "text", "max_length": 64})
    assert base != cache_key([str(f)], tiny_tokenizer(vocab_size=390), {"format": "text", "max_length": 64})
    f.write_text('{"text": "b"}\n')
    assert base != cache_key([str(f)], tok, {"format": "text", "max_length": 64})


def test_mixing_probabilities_weights_and_temperature():
    sizes = {"big": 900, "small": 100}
    assert mixing_probabilities(sizes) == pytest.approx({"big": 0.9, "small": 0.1})
    assert mixing_probabilities(sizes, temperature=2.0) == pytest.approx({"big": 0.75, "small": 0.25})
    assert mixing_probabilities(sizes, temperature=1e9) == pytest.approx({"big": 0.5, "small": 0.5})
    assert mixing_probabilities(sizes, weights={"big": 1, "small": 3}) == pytest.approx({"big": 0.25, "small": 0.75})
    with pytest.raises(DataError, match=r"unknown task\(s\) \['smal'\], missing task\(s\) \['small'\]"):
        mixing_probabilities(sizes, weights={"big": 1, "smal": 1})
    with pytest.raises(DataError, match="mix_temperature=0"):
        mixing_probabilities(sizes, temperature=0)
    with pytest.raises(DataError, match=r"task\(s\) \['small'\] have no training examples"):
        mixing_probabilities({"big": 3, "small": 0})


def test_mix_tasks_counts_coverage_and_seed():
    tasks = {"a": [{"input_ids": [i], "labels": [i]} for i in range(10)],
             "b": [{"input_ids": [100 + i], "labels": [100 + i]} for i in range(3)]}
    mixed = mix_tasks(tasks, weights={"a": 1, "b": 1}, num_examples=20, seed=1)
    assert len(mixed) == 20 and sum(e["task"] == "b" for e in mixed) == 10
    b_ids = sorted(e["input_ids"][0] for e in mixed if e["task"] == "b")
    # b (3 examples) is up-sampled to 10: every example 3 or 4 times, never 2 vs 5.
    assert {b_ids.count(100 + i) for i in range(3)} <= {3, 4}
    a_ids = [e["input_ids"][0] for e in mixed if e["task"] == "a"]
    assert sorted(a_ids) == list(range(10))
    assert mix_tasks(tasks, num_examples=20, seed=1) == mix_tasks(tasks, num_examples=20, seed=1)
    assert mix_tasks(tasks, num_examples=20, seed=1) != mix_tasks(tasks, num_examples=20, seed=2)
    assert "task" not in tasks["a"][0]
