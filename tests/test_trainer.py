"""End-to-end training on a tiny random Llama: every mode learns, frozen weights stay put,
resume == uninterrupted, early stopping, gradient accumulation, checkpoints load in HF/PEFT."""
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from fastft.config import load_config
from fastft.train.cli import build, run
from fastft.train.trainer import Trainer
from fastft.train.utils import resolve_dtype
from trainer_helpers import bundled_rows, make_tiny_model, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py: tiny models run on one thread
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def base_args(tiny, run_dir, *extra):
    return ["--model.path", str(tiny), "--output.dir", str(run_dir), "--train.progress", "false",
            "--output.tensorboard", "false", "--train.batch_size", "8", *extra]


def metrics(run_dir, event="train"):
    return [r for r in map(json.loads, open(Path(run_dir) / "metrics.jsonl")) if r["event"] == event]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


MODES = {
    "full": ["--finetune.mode", "full", "--train.lr", "3e-3"],
    "partial": ["--finetune.mode", "partial", "--finetune.freeze_layers", "1", "--train.lr", "3e-3"],
    "head": ["--finetune.mode", "head", "--train.lr", "1e-2"],
    "progressive": ["--finetune.mode", "head", "--finetune.unfreeze_after_steps", "10", "--train.lr", "3e-3"],
    "lora": ["--finetune.mode", "lora", "--lora.r", "8", "--lora.target_modules", "q_proj,k_proj,v_proj,o_proj,"
             "gate_proj,up_proj,down_proj", "--train.lr", "1e-2"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_loss_falls_and_frozen_params_bit_identical(tiny, tmp_path, mode, monkeypatch):
    cfg = load_config(None, base_args(tiny, tmp_path / "run", "--train.max_steps", "25", *MODES[mode]))
    model, tok, bundle, device = build(cfg)
    before = snapshot(model)
    trainable0 = {n for n, p in model.named_parameters() if p.requires_grad}
    (tmp_path / "run").mkdir()
    summary = Trainer(cfg, tmp_path / "run", model, tok, bundle, device).train()
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"] - 0.05
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    if mode == "progressive":
        assert trainable0 and len(trainable0) < len(before)
        assert {n for n in before if "layers.0." in n} & changed  # unfrozen later, then trained
        return
    frozen = set(before) - trainable0
    assert frozen or mode == "full"
    assert not (frozen & changed), f"frozen params changed: {sorted(frozen & changed)[:3]}"
    assert trainable0 <= changed | {n for n in trainable0 if "lora_B" in n and False}
    if mode == "partial":
        assert not any("layers.0." in n or "embed_tokens" in n for n in trainable0)
        assert any("layers.1." in n for n in trainable0)
    if mode == "head":
        assert trainable0 == {"lm_head.weight"}
    if mode == "lora":
        assert trainable0 and all("lora_" in n for n in trainable0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_equals_uninterrupted(tiny, tmp_path, mode):
    """bf16 weights; full mode also has fp32 masters in the optimizer state."""
    common = ["--train.max_steps", "12", "--train.eval_every", "6", "--model.dropout", "0.1",
              "--lora.dropout", "0.1", "--train.lr", "5e-3", "--train.warmup_steps", "2", "--finetune.mode", mode,
              "--train.weight_decay", "0.01"]
    sub, fname = ("adapter", "adapter_model.safetensors") if mode == "lora" else ("model", "model.safetensors")
    full = run(None, base_args(tiny, tmp_path / "a", *common))
    assert full["steps"] == 12

    def interrupt_at_6(model, tok, data, step):  # Ctrl-C arrives during step 6's evaluation
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return {}

    part = run(None, base_args(tiny, tmp_path / "b", *common), metrics_hook=interrupt_at_6)
    assert part["interrupted"] and part["steps"] == 6
    assert (tmp_path / "b" / "checkpoints" / "step-000006" / sub).is_dir()
    rest = run(None, base_args(tiny, tmp_path / "b", *common), resume=True)
    assert rest["steps"] == 12
    la, lb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in lb] == list(range(1, 13))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # bit-for-bit, dropout on
    assert [r["lr"] for r in la] == [r["lr"] for r in lb]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "final" / sub / fname))
    wb = load_file(str(tmp_path / "b" / "final" / sub / fname))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_early_stopping_fires_and_keeps_best(tiny, tmp_path):
    s = run(None, base_args(tiny, tmp_path / "r", "--train.max_steps", "100", "--train.eval_every", "2",
                            "--train.early_stopping_patience", "2", "--train.early_stopping_min_delta", "100",
                            "--train.keep_last", "1", "--train.lr", "1e-2"))
    # first eval sets the best; nothing beats it by 100, so evals 2 and 3 (steps 4, 6) are "bad"
    assert s["stopped_early"] and s["steps"] == 6
    root = tmp_path / "r" / "checkpoints"
    assert (root / "best").read_text().strip() == "step-000002"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-000002", "step-000006"]
    assert len(metrics(tmp_path / "r", "eval")) == 1 + 3 + 1  # before, 3 periodic, final


def _grads_of_first_step(tiny, tmp_path, batch_size, grad_accum, name, *extra):
    cfg = load_config(None, base_args(tiny, tmp_path / name, "--finetune.mode", "full", "--model.dtype", "fp32",
                                      "--train.batch_size", str(batch_size), "--train.grad_accum",
                                      str(grad_accum), "--train.max_steps", "1", *extra))
    torch.manual_seed(0)
    model, tok, bundle, device = build(cfg)
    tr = Trainer(cfg, tmp_path / name, model, tok, bundle, device)
    grads = {}
    orig = tr.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return orig(*a, **k)

    tr.optimizer.step = capture
    (tmp_path / name).mkdir()
    tr.train_step()
    return grads, tr


def test_grad_accum_matches_one_big_batch(tiny, tmp_path):
    g_acc, tr = _grads_of_first_step(tiny, tmp_path, 2, 4, "acc")
    g_big, _ = _grads_of_first_step(tiny, tmp_path, 8, 1, "big")
    assert g_acc.keys() == g_big.keys() and len(g_acc) > 0
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-6)
    # the micro-batches have different target counts, so the naive mean of per-micro-batch means
    # (the pre-2024 HF bug) gives a different gradient: this test can tell the two apart
    counts = [int((tr._micro_batch(j)["labels"][:, 1:] != -100).sum()) for j in range(4)]
    assert len(set(counts)) > 1


def test_gradient_checkpointing_gives_the_same_gradients(tiny, tmp_path):
    g_plain, _ = _grads_of_first_step(tiny, tmp_path, 4, 1, "plain", "--model.dropout", "0")
    g_ckpt, tr = _grads_of_first_step(tiny, tmp_path, 4, 1, "ckpt", "--model.dropout", "0",
                                      "--model.gradient_checkpointing", "true")
    assert tr.model.model.layers[0].gradient_checkpointing
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7)


def test_two_process_gloo_run_matches_one_process(tiny, tmp_path):
    """torchrun with 2 CPU ranks x batch 4 == 1 process x batch 8 (shards interleave the
    permutation; losses and target counts are all-reduced; DDP averages the gradients)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    common = ["--model.dtype", "fp32", "--finetune.mode", "full", "--train.max_steps", "3", "--model.dropout", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "fastft.cli", "train", *base_args(tiny, tmp_path / "ddp", *common, "--train.batch_size", "4")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    run(None, base_args(tiny, tmp_path / "one", *common, "--train.batch_size", "8"))
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert [r["target_tokens"] for r in a] == [r["target_tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_checkpoint_loads_in_transformers_and_peft(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = run(None, base_args(tiny, tmp_path / "l", "--train.max_steps", "8", "--train.lr", "1e-2",
                            "--output.save_merged", "true", "--model.dtype", "fp32", "--lora.dropout", "0"))
    x = torch.randint(4, 200, (2, 11))
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ref = base(x).logits
    peft_model = PeftModel.from_pretrained(base, tmp_path / "l" / "final" / "adapter").eval()
    with torch.no_grad():
        adapted = peft_model(x).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "l" / "merged", dtype=torch.float32)(x).logits
    assert (adapted - ref).abs().max() > 1e-4  # the adapter learned something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    s = run(None, base_args(tiny, tmp_path / "f", "--train.max_steps", "3", "--finetune.mode", "full",
                            "--train.save_every", "2"))
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "f" / "final" / "model")
    # the export keeps the run's dtype: model.dtype=auto is bf16 only where the CPU has bf16 units
    run_dtype = resolve_dtype("auto", torch.device("cpu"))
    assert m.dtype == run_dtype and m(x).logits.shape == (2, 11, m.config.vocab_size)
    assert (tmp_path / "f" / "checkpoints" / "step-000002" / "model" / "config.json").is_file()
    assert s["steps"] == 3


def test_discriminative_lr_and_no_decay_groups(tiny, tmp_path):
    cfg = load_config(None, base_args(tiny, tmp_path / "g", "--finetune.mode", "full", "--train.lr", "1e-3",
                                      "--train.weight_decay", "0.1", "--finetune.backbone_lr_scale", "0.5",
                                      "--finetune.layer_lr_decay", "0.5"))
    from fastft.train.finetune import param_groups

    model, *_ = build(cfg)
    lr_of, wd_of = {}, {}
    for g in param_groups(model, cfg.finetune, 1e-3, 0.1):
        for n in g["names"]:
            lr_of[n], wd_of[n] = g["lr"], g["weight_decay"]
    assert lr_of["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(5e-4)  # top layer: 0.5 * 1
    assert lr_of["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(2.5e-4)  # one layer down
    assert lr_of["model.embed_tokens.weight"] == pytest.approx(2.5e-4)
    assert wd_of["model.layers.0.input_layernorm.weight"] == 0.0 and wd_of["model.norm.weight"] == 0.0
    assert wd_of["model.embed_tokens.weight"] == 0.0 and wd_of["model.layers.0.mlp.up_proj.weight"] == 0.1


def test_schedulers():
    from fastft.train.utils import lr_factor

    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_instruction_labels_mask_prompt_and_train_eos(tiny):
    from fastft.data.instruction import tokenize_row
    from fastft.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny))
    tok.pad_token = tok.eos_token  # pad == eos must not mask the response's EOS
    row = {"instruction": "Reverse the letters of the word.", "input": "pencil", "output": "licnep"}
    ex = tokenize_row(row, tok, max_length=256)
    target = [t for t in ex["labels"] if t != -100]
    assert target == tok("licnep", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, *target[2:]]
    assert target[1] == tok.eos_token_id
    n_prompt = ex["labels"].index(target[0])
    assert all(x == -100 for x in ex["labels"][:n_prompt]) and ex["input_ids"][n_prompt:] == ex["labels"][n_prompt:]
    assert "licnep" not in tok.decode(ex["input_ids"][:n_prompt])
    short = tokenize_row(row, tok, max_length=5)
    assert len(short["input_ids"]) == len(short["labels"]) == 5


CLI_ERRORS = [
    (["--model.path", "/nonexistent/model"], "model.path='/nonexistent/model'"),
    (["--data.train_file", "/nonexistent.jsonl"], "not found"),
    (["--train.lr", "-0.1"], "train.lr=-0.1"),
    (["--lora.r", "0"], "lora.r=0"),
    (["--lora.target_modules", "qq_proj"], "lora.target_modules=['qq_proj']: no module matched"),
    (["--train.warmup_steps", "999"], "warmup must be shorter than the run"),
    (["--model.path", "nobody/not-a-cached-model"], "not in the Hugging Face cache"),
    (["--train.early_stopping_patience", "2", "--train.eval_every", "2", "--train.early_stopping_metric", "acuracy"],
     "train.early_stopping_metric='acuracy': the evaluation reports eval_loss, eval_ppl"),
    (["--train.early_stopping_patience", "2", "--train.eval_every", "2", "--data.val_ratio", "0"],
     "nothing (no validation data)"),
    # patience without evaluations used to do nothing silently
    (["--train.early_stopping_patience", "2"], "train.early_stopping_patience=2 needs evaluations during training"),
    # the value of --train.lr is missing (it used to say "unexpected argument 'x'")
    (["--train.lr", "--output.dir", "x"], "--train.lr needs a value"),
]


@pytest.mark.parametrize("extra, needle", CLI_ERRORS)
def test_cli_bad_input_one_line_exit_2(tiny, tmp_path, capsys, extra, needle):
    from fastft.cli import main

    run_dir = tmp_path / "run"
    args = ["train"] + base_args(tiny, run_dir, "--train.max_steps", "3")
    args += extra
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and needle in err and "\n" not in err and "Traceback" not in err
    assert not run_dir.exists()


def test_cli_empty_dataset_and_existing_run_dir(tiny, tmp_path, capsys):
    from fastft.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        main(["train"] + base_args(tiny, tmp_path / "r0", "--data.train_file", str(empty)))
    assert e.value.code == 2 and "no training examples" in capsys.readouterr().err
    small = write_jsonl(tmp_path / "small.jsonl", bundled_rows(40))
    args = ["train"] + base_args(tiny, tmp_path / "r1", "--data.train_file", str(small), "--train.max_steps", "2")
    main(args)
    out = capsys.readouterr().out
    assert "held-out loss before:" in out and "run dir:" in out
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "already holds a run" in err and "--overwrite" in err
    test = write_jsonl(tmp_path / "test.jsonl", bundled_rows(60)[40:])
    main(args + ["--overwrite", "--data.test_file", str(test)])
    assert len(metrics(tmp_path / "r1")) == 2
    (rec,) = metrics(tmp_path / "r1", "test")
    assert rec["test_loss"] > 0 and rec["test_tokens"] > 0 and "test loss:" in capsys.readouterr().out


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_module_matches_hf_loss(tiny, smoothing):
    """CausalLMLoss (only target positions through the head) == HF's shifted cross-entropy."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from fastft.train.utils import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    ids = torch.randint(4, 900, (3, 17))
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    labels[2, 12:] = -100  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    loss_sum, n = CausalLMLoss(model, label_smoothing=smoothing, fused_ce=False)(ids, mask, labels)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].reshape(-1, model.config.vocab_size)
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum",
                          label_smoothing=smoothing)
    assert int(n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-5)
    if smoothing == 0.0:
        hf = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(loss_sum / n, hf, rtol=1e-5, atol=1e-5)


def test_model_sources(tmp_path, monkeypatch):
    from fastft.errors import UserError
    from fastft.models.loading import resolve_source

    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == (str(tmp_path), "m.Q4.gguf")
    assert resolve_source(str(tmp_path), "m.Q4.gguf") == (str(tmp_path), "m.Q4.gguf")
    assert resolve_source(str(tmp_path)) == (str(tmp_path), "m.Q4.gguf")  # the folder's only GGUF
    (tmp_path / "m.Q8.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="several GGUF files"):
        resolve_source(str(tmp_path))
    with pytest.raises(UserError, match="model.gguf_file='other.gguf' not found"):
        resolve_source(str(tmp_path), "other.gguf")
    with pytest.raises(UserError, match="no such file"):
        resolve_source(str(tmp_path / "missing.gguf"))
    assert resolve_source("org/model") == ("org/model", None)  # a hub id: resolved offline later
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    from fastft.models.loading import materialize

    with pytest.raises(UserError, match="cannot load this GGUF file"):
        materialize(str(gguf))
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
    with pytest.raises(UserError, match="package 'no_such_pkg' is not installed"):
        resolve_source("pkg:no_such_pkg/model")


def test_tensorboard_and_resolved_config_written(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from fastft.config import from_dict

    args = base_args(tiny, tmp_path / "tb", "--train.max_steps", "2")
    args[args.index("--output.tensorboard") + 1] = "true"
    run(None, args)
    assert any((tmp_path / "tb" / "tensorboard").iterdir())
    import yaml

    saved = from_dict(yaml.safe_load((tmp_path / "tb" / "config.yaml").read_text()))
    assert saved.train.max_steps == 2 and saved.output.dir == str(tmp_path / "tb")
    assert "lora adapters" in (tmp_path / "tb" / "params.txt").read_text()


def test_fp16_loss_scaling_skips_overflow_and_unscales(tiny, tmp_path):
    """The fp16 path (meant for GPUs; CPU here runs the same logic): steps whose scaled grads
    overflow are skipped with the scale halved and the weights untouched; good steps update."""
    cfg = load_config(None, base_args(tiny, tmp_path / "h", "--finetune.mode", "full", "--model.dtype", "fp32",
                                      "--train.max_steps", "40", "--train.lr", "1e-3"))
    model, tok, bundle, device = build(cfg)
    model.half()
    (tmp_path / "h").mkdir()
    tr = Trainer(cfg, tmp_path / "h", model, tok, bundle, device)
    assert tr.fp16 and tr.low_precision and tr.loss_scale == 2.0 ** 16
    tr.loss_scale = 2.0 ** 40  # certain overflow in fp16 gradients
    w0 = snapshot(model)
    rec = tr.train_step()
    assert rec["skipped"] and tr.loss_scale == 2.0 ** 39
    assert all(torch.equal(w0[n], p) for n, p in model.named_parameters())
    for _ in range(30):
        rec = tr.train_step()
        if not rec["skipped"]:
            break
    assert not rec["skipped"] and math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
    assert any(not torch.equal(w0[n], p) for n, p in model.named_parameters())
