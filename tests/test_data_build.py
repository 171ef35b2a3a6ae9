"""build_datasets end to end: every format through the config, the instruction mask token by
token, cache hits, splits, mixing with per-task validation, packing, bad input -> DataError."""
from __future__ import annotations

import json

import pytest

from _data_util import tiny_tokenizer
from fastft.config import load_config
from fastft.data import build_datasets, default_train_file
from fastft.data.cache import data_cache_dir
from fastft.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))


def _cfg(*overrides):
    return load_config(None, list(overrides)).data


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_instruction_default_matches_the_first_data_path():
    """The bundled default through the new pipeline gives exactly what instruction.py gives."""
    from fastft.data.instruction import load_instruction_file

    tok = tiny_tokenizer()
    bundle = build_datasets(_cfg(), tok, seed=0)
    ref, dropped = load_instruction_file(default_train_file(), tok, 256)
    assert dropped == 0 and len(bundle.train) + len(bundle.validation) == len(ref) == 383
    assert sorted(map(str, bundle.train + bundle.validation)) == sorted(map(str, ref))
    assert bundle.stats["train"] == len(bundle.train) and bundle.stats["dropped_no_target"] == 0


def test_instruction_label_mask_token_by_token(tmp_path):
    tok = tiny_tokenizer()
    f = _jsonl(tmp_path / "i.jsonl", [{"instruction": "What is 2 + 3?", "input": "", "output": "5."},
                                      {"instruction": "Reverse the word.", "input": "kernel", "output": "lenrek"}])
    b = build_datasets(_cfg("--data.train_file", f, "--data.val_ratio", "0"), tok)
    for ex, (user, answer) in zip(b.train, [("What is 2 + 3?", "5."), ("Reverse the word.\n\nkernel", "lenrek")]):
        prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        n = len(p_ids)
        assert ex["input_ids"][:n] == p_ids
        assert ex["labels"][:n] == [-100] * n  # every prompt token masked
        # every response token trained, and it ends with the EOS (= pad here) being trained
        assert ex["labels"][n:] == ex["input_ids"][n:]
        assert tok.decode(ex["input_ids"][n:]).startswith(answer + "<|im_end|>")
        assert tok.eos_token_id in ex["labels"][n:]


@pytest.mark.parametrize("fmt,rows", [
    ("chat", [{"messages": [{"role": "user", "content": f"Hello {i}!"}, {"role": "assistant", "content": "Hi."}]}
              for i in range(6)]),
    ("prompt_completion", [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}"} for i in range(6)]),
    ("text", [{"text": f"The pasta was wonderful, day {i}."} for i in range(6)]),
])
def test_each_format_builds_and_second_run_hits_the_cache(tmp_path, fmt, rows):
    tok = tiny_tokenizer()
    f = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg("--data.train_file", f, "--data.format", fmt, "--data.val_ratio", "0.2")
    a = build_datasets(cfg, tok, seed=1)
    assert len(a.train) == 5 and len(a.validation) == 1
    assert all(any(l != -100 for l in e["labels"][1:]) for e in a.train)
    entries = list(data_cache_dir().glob("*.npz"))
    assert len(entries) == 1
    mtime = entries[0].stat().st_mtime_ns
    b = build_datasets(cfg, tok, seed=1)
    assert b.train == a.train and b.validation == a.validation
    assert entries[0].stat().st_mtime_ns == mtime  # read, not rewritten
    build_datasets(_cfg("--data.train_file", f, "--data.format", fmt, "--data.max_length", "200"), tok)
    assert len(list(data_cache_dir().glob("*.npz"))) == 2  # settings are part of the key


def test_columns_cleaning_excess_length_and_splits(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"q": f"What is {i} + 1?", "a": f" {i + 1}"} for i in range(20)] + [{"q": "What is 0 + 1?", "a": " 1"},
                                                                            {"q": "  ", "a": "x"}]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    b = build_datasets(_cfg("--data.train_file", f, "--data.format", "prompt_completion", "--data.columns",
                            "prompt=q,completion=a", "--data.drop_duplicates", "true", "--data.test_ratio", "0.1",
                            "--data.val_ratio", "0.1"), tok)
    assert b.stats["dropped_duplicates"] == 1 and b.stats["dropped_empty"] == 1
    assert (len(b.train), len(b.validation), len(b.test)) == (16, 2, 2)
    with pytest.raises(DataError, match=r"row 0 has \d+ tokens > data.max_length=8"):
        build_datasets(_cfg("--data.train_file", f, "--data.format", "prompt_completion", "--data.columns",
                            "prompt=q,completion=a", "--data.max_length", "8", "--data.excess_length", "error"), tok)
    with pytest.raises(DataError, match=r"needs column\(s\) \['prompt', 'completion'\]; the data has columns \['a', 'q'\]"):
        build_datasets(_cfg("--data.train_file", f, "--data.format", "prompt_completion"), tok)
    with pytest.raises(ConfigError, match="data.columns: entry 'prompt' must look like name=value"):
        build_datasets(_cfg("--data.train_file", f, "--data.columns", "prompt"), tok)


def test_mixing_tasks_with_per_task_validation(tmp_path):
    tok = tiny_tokenizer()
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"apple {i}"} for i in range(30)])
    g = _jsonl(tmp_path / "g.jsonl", [{"text": f"general {i}"} for i in range(10)])
    b = build_datasets(_cfg("--data.train_file", a, "--data.format", "text", "--data.tasks", f"general={g}",
                            "--data.mix_weights", "main=1,general=1"), tok)
    assert set(b.tasks) == {"main", "general"} and len(b.tasks["main"]) == 3 and len(b.tasks["general"]) == 1
    assert len(b.validation) == 4 and all(e["task"] in ("main", "general") for e in b.validation)
    assert b.stats["train_main"] == b.stats["train_general"] == len(b.train) // 2


def test_packing_through_build(tmp_path):
    tok = tiny_tokenizer()
    f = _jsonl(tmp_path / "d.jsonl", [{"text": f"The pasta was wonderful, day {i}."} for i in range(40)])
    b = build_datasets(_cfg("--data.train_file", f, "--data.format", "text", "--data.packing", "true",
                            "--data.max_length", "64"), tok)
    assert b.stats["packed_samples"] == 36 and len(b.train) < 36
    assert all("position_ids" in r and len(r["input_ids"]) <= 64 for r in b.train)
    # the trainer uses the packing collator: per-sample position ids and the 2-D padding mask (no
    # (B, 1, T, T) mask; the loss keeps samples apart, tests/test_data_packing.py)
    from fastft.data.packing import PackedCollator

    batch = b.collator(b.train[:2])
    assert isinstance(b.collator, PackedCollator)
    assert batch["attention_mask"].dim() == 2 and batch["position_ids"].shape == batch["input_ids"].shape
    assert int((batch["position_ids"] == 0).sum()) > 2  # sample starts inside the rows


def test_empty_and_malformed_files(tmp_path):
    tok = tiny_tokenizer()
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no training examples"):
        build_datasets(_cfg("--data.train_file", str(empty)), tok)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n' * 3)
    with pytest.raises(DataError, match=r"b\.jsonl:2: malformed JSON"):
        build_datasets(_cfg("--data.train_file", str(bad)), tok)
    out = build_datasets(_cfg("--data.train_file", str(bad), "--data.on_bad_line", "skip", "--data.val_ratio", "0"), tok)
    assert out.stats["skipped_bad_lines"] == 3 and len(out.train) == 3  # duplicates kept by default


def test_per_task_validation_losses_from_the_metrics_hook(tmp_path):
    """Mixed tasks: the hook reports each task's validation loss, equal to the HF loss on it."""
    import torch

    from _data_util import tiny_llama
    from fastft.data.collate import Collator
    from fastft.metrics import make_metrics_hook

    tok = tiny_tokenizer()
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"The pasta was wonderful, day {i}."} for i in range(30)])
    g = _jsonl(tmp_path / "g.jsonl", [{"text": f"What is {i} + 1? {i + 1}."} for i in range(20)])
    b = build_datasets(_cfg("--data.train_file", a, "--data.format", "text", "--data.tasks", f"general={g}",
                            "--data.mix_temperature", "2"), tok)
    assert make_metrics_hook(build_datasets(_cfg("--data.train_file", a, "--data.format", "text"), tok),
                             None, tok.pad_token_id) is None  # one task: nothing to add
    model = tiny_llama(vocab_size=len(tok))
    out = make_metrics_hook(b, None, tok.pad_token_id, batch_size=2)(model, tok, b, 0)
    assert set(out) == {"main/eval_loss", "main/eval_ppl", "general/eval_loss", "general/eval_ppl"}
    for name in ("main", "general"):
        with torch.no_grad():
            ref = model(**Collator(tok.pad_token_id)(b.tasks[name])).loss.item()
        assert out[f"{name}/eval_loss"] == pytest.approx(ref, rel=1e-5)
    assert out["main/eval_loss"] != out["general/eval_loss"]


@pytest.mark.parametrize("case", ["latin1", "malformed", "missing_column", "unseen_label", "empty_text_no_drop"])
def test_fastft_train_bad_data_exits_2_with_one_line_and_no_run_dir(case, tmp_path, capsys):
    from trainer_helpers import make_tiny_model

    from fastft.cli import main

    model = make_tiny_model(tmp_path / "tiny")
    f = tmp_path / "d.jsonl"
    extra: list[str] = []
    if case == "latin1":
        f.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
        want = "d.jsonl:2: bytes are not valid UTF-8"
    elif case == "malformed":
        f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a",\n')
        want = "d.jsonl:2: malformed JSON"
    elif case == "missing_column":
        f.write_text('{"question": "a", "answer": "b"}\n')
        want = "needs column(s) ['instruction', 'output']; the data has columns ['answer', 'question']"
    elif case == "unseen_label":
        f.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
        v = tmp_path / "v.jsonl"
        v.write_text('{"text": "so-so", "label": "mixed"}\n')
        extra = ["--data.format", "classification", "--data.validation_file", str(v)]
        want = "label 'mixed' was not seen in training"
    else:
        f.write_text('{"text": "good", "label": "pos"}\n{"text": "  ", "label": "neg"}\n')
        extra = ["--data.format", "classification", "--data.drop_empty", "false"]
        want = "row 1: empty text"
    run_dir = tmp_path / "run"
    code = 0
    try:
        main(["train", "--model.path", str(model), "--data.train_file", str(f), "--output.dir", str(run_dir),
              "--train.max_steps", "1", "--train.progress", "false", *extra])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "it/s]" not in ln
             and not ln.startswith(("[transformers]", "Key ", "---", "score.", "classifier.", "Notes:", "- MISSING"))]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], err
    assert not run_dir.exists()
