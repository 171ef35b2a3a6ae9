"""`fastft generate` and `fastft eval` on tiny saved models: greedy output equals HF's greedy
decode, seeded sampling is reproducible, an adapter is merged in, eval loss equals the HF loss,
classification metrics match argmax, and bad input exits 2 with one line and writes nothing."""
from __future__ import annotations

import json

import pytest
import torch

from _data_util import tiny_llama, tiny_tokenizer
from fastft.cli import main

PROMPT = "What is 2 + 3?"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py: tiny models run on one thread
    yield


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def lm_dir(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    folder = tmp_path / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _cli(args, capsys):
    """Run the fastft CLI in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def _hf_greedy(folder, text, n, chat=True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(text, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
    seq = ids
    with torch.no_grad():  # plain argmax loop: an oracle independent of generate()
        for _ in range(n):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
            if nxt.item() == tok.eos_token_id:
                break
    return tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_greedy_matches_argmax_decoding(lm_dir, capsys):
    code, out, err = _cli(["generate", PROMPT, "--model", str(lm_dir), "--greedy", "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    text = tiny_tokenizer().apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                add_generation_prompt=True)
    assert out == _hf_greedy(lm_dir, text, 8) + "\n"
    code, raw, _ = _cli(["generate", PROMPT, "--model", str(lm_dir), "--temperature", "0", "--template", "raw",
                         "--max-new-tokens", "8"], capsys)
    assert code == 0 and raw == _hf_greedy(lm_dir, PROMPT, 8, chat=False) + "\n"


def test_generate_sampling_is_seeded(lm_dir, capsys):
    args = ["generate", PROMPT, "--model", str(lm_dir), "--max-new-tokens", "12", "--temperature", "1.5",
            "--top-p", "1.0"]
    a = _cli(args + ["--seed", "1"], capsys)[1]
    b = _cli(args + ["--seed", "1"], capsys)[1]
    c = _cli(args + ["--seed", "2"], capsys)[1]
    assert a == b and a != c  # a random 400-token model: two seeds give the same 12 tokens with p ~ 0


def test_generate_with_adapter_uses_the_merged_weights(lm_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(lm_dir),
                                LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tiny_tokenizer().save_pretrained(tmp_path / "merged")
    args = ["generate", PROMPT, "--greedy", "--max-new-tokens", "10"]
    code, with_adapter, err = _cli(args + ["--model", str(lm_dir), "--adapter", str(tmp_path / "adapter")], capsys)
    assert code == 0, err
    assert with_adapter == _cli(args + ["--model", str(tmp_path / "merged")], capsys)[1]
    assert with_adapter != _cli(args + ["--model", str(lm_dir)], capsys)[1]


def test_eval_loss_equals_hf_loss(lm_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from fastft.data.chat import encode_rows
    from fastft.data.collate import Collator
    from fastft.train.eval_cli import run_eval

    rows = [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}."} for i in range(5)]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_eval(str(lm_dir), str(data), "prompt_completion", batch_size=2, output_dir=str(tmp_path / "out"))
    tok = tiny_tokenizer()
    batch = Collator(tok.pad_token_id)(encode_rows(rows, "prompt_completion", tok))
    ref = AutoModelForCausalLM.from_pretrained(lm_dir)(**batch).loss.item()  # token mean over all targets
    assert m["eval_loss"] == pytest.approx(ref, rel=1e-5)
    assert m["target_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert json.loads((tmp_path / "out" / "eval_metrics.json").read_text())["eval_loss"] == m["eval_loss"]
    code, out, _ = _cli(["eval", "--model", str(lm_dir), "--data", str(data), "--format", "prompt_completion"], capsys)
    assert code == 0 and out.startswith(f"eval_loss={ref:.4f} ")


def _tiny_bert(folder, head=True):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = tiny_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
                     label2id={"negative": 0, "neutral": 1, "positive": 2}, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    (BertForSequenceClassification(cfg) if head else BertModel(cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_eval_classification_metrics_match_argmax(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from fastft.data import BUNDLED
    from fastft.train.eval_cli import run_eval
    from fastft.train.metrics import classification_metrics

    folder = _tiny_bert(tmp_path / "bert")
    data = str(BUNDLED / "sentiment.jsonl")
    m = run_eval(str(folder), data, "classification", batch_size=64, output_dir=str(tmp_path / "out"))
    rows = [json.loads(line) for line in open(data)]
    tok = tiny_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    names = ["negative", "neutral", "positive"]
    with torch.no_grad():
        preds = [model(**tok(r["text"], return_tensors="pt")).logits.argmax(-1).item() for r in rows]
    ref = classification_metrics([names.index(r["label"]) for r in rows], preds, names)
    for k in ("accuracy", "precision", "recall", "macro_f1"):
        assert m[k] == pytest.approx(ref[k])
    assert (tmp_path / "out" / "confusion_matrix.csv").is_file() and m["examples"] == 360
    code, out, _ = _cli(["eval", "--model", str(folder), "--data", data, "--format", "classification"], capsys)
    assert code == 0 and out.startswith(f"accuracy={ref['accuracy']:.3f} ")


@pytest.mark.parametrize("case", ["no_model", "no_data", "temperature", "top_p", "no_template", "unseen_label",
                                  "no_head", "bad_json"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, lm_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    good = tmp_path / "pc.jsonl"
    good.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    if case == "no_model":
        args, want = ["generate", PROMPT, "--model", str(tmp_path / "missing")], "no such file or directory"
    elif case == "no_data":
        args = ["eval", "--model", str(lm_dir), "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(out_dir)]
        want = "nope.jsonl"
    elif case == "temperature":
        args, want = ["generate", PROMPT, "--model", str(lm_dir), "--temperature", "-1"], "--temperature -1.0"
    elif case == "top_p":
        args, want = ["generate", PROMPT, "--model", str(lm_dir), "--top-p", "0"], "--top-p 0.0"
    elif case == "no_template":
        no_tpl = tmp_path / "no_tpl"
        tiny_llama(vocab_size=400).save_pretrained(no_tpl)
        tiny_tokenizer(chat_template=False).save_pretrained(no_tpl)
        args, want = ["generate", PROMPT, "--model", str(no_tpl), "--template", "chat"], "no chat template"
    elif case == "unseen_label":
        bad = tmp_path / "s.jsonl"
        bad.write_text(json.dumps({"text": "so-so", "label": "mixed"}) + "\n")
        args = ["eval", "--model", str(_tiny_bert(tmp_path / "bert")), "--data", str(bad), "--format",
                "classification", "--output-dir", str(out_dir)]
        want = "label 'mixed' was not seen in training"
    elif case == "no_head":
        args = ["eval", "--model", str(_tiny_bert(tmp_path / "bert", head=False)), "--data", str(good),
                "--format", "classification", "--output-dir", str(out_dir)]
        want = "no trained classification head"
    else:
        bad = tmp_path / "b.jsonl"
        bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
        args = ["eval", "--model", str(lm_dir), "--data", str(bad), "--format", "prompt_completion",
                "--output-dir", str(out_dir)]
        want = "b.jsonl:2: malformed JSON"
    code, out, err = _cli(args, capsys)
    assert code == 2
    # transformers' weight-loading progress bars may precede it; the error itself is one line.
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "it/s]" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], err
    assert "Traceback" not in err
    assert not out_dir.exists()
