"""Runs that survive users (issue 19): resume keeps the run's settings and its lr schedule, crash
debris is cleaned, the best weights are kept, divergence stops with exit code 3 and nothing
non-finite on disk, curves.png. Tiny random Llama, a few steps each."""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastft.errors import ConfigError, TrainingDiverged
from fastft.train.cli import run
from fastft.train.utils import LrSchedule, lr_factor
from trainer_helpers import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
ADAPTER = ("adapter", "adapter_model.safetensors")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def args(tiny, run_dir, *extra):
    return ["--model.path", str(tiny), "--output.dir", str(run_dir), "--train.progress", "false",
            "--output.tensorboard", "false", "--train.batch_size", "8", "--lora.r", "4", *extra]


def records(run_dir, event="train"):
    return [r for r in map(json.loads, open(Path(run_dir) / "metrics.jsonl")) if r.get("event") == event]


def adapter_weights(folder):
    return load_file(str(Path(folder) / ADAPTER[0] / ADAPTER[1]))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupt_at(n):
    def hook(model, tok, data, step):  # Ctrl-C arrives during step n's evaluation
        if step == n:
            os.kill(os.getpid(), signal.SIGINT)
        return {}
    return hook


def child_env():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FASTFT_HUGEPAGES": "0"}


# ------------------------------------------------------------------ resume
def test_printed_resume_command_runs_literally(tiny, tmp_path, capsys):
    run_dir = tmp_path / "my run"  # a space: the printed command must quote it
    common = ["--train.max_steps", "8", "--train.eval_every", "4", "--train.lr", "5e-3", "--lora.alpha", "8"]
    part = run(None, args(tiny, run_dir, *common), metrics_hook=interrupt_at(4))
    assert part["interrupted"] and part["steps"] == 4
    line = [ln for ln in capsys.readouterr().out.splitlines() if "Resume with: " in ln][-1]
    cmd = line.split("Resume with: ", 1)[1]
    saved = (run_dir / "config.yaml").read_text()
    argv = shlex.split(cmd)
    assert argv[0] == "fastft"
    exe = shutil.which("fastft")
    argv = [exe] + argv[1:] if exe else [sys.executable, "-m", "fastft.cli"] + argv[1:]
    p = subprocess.run(argv, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stdout and "at step 4" in p.stdout
    assert [r["step"] for r in records(run_dir)] == list(range(1, 9))
    assert (run_dir / "config.yaml").read_text() == saved  # lr 5e-3, alpha 8, the tiny model: all kept
    assert {r["lr"] for r in records(run_dir)[4:]} <= {5e-3 * lr_factor(s, 8, 0, "cosine") for s in range(4, 8)}
    assert (run_dir / "final" / "adapter").is_dir()


def test_resume_refuses_unsafe_keys_and_writes_nothing(tiny, tmp_path):
    run_dir = tmp_path / "r"
    common = ["--train.max_steps", "6", "--train.eval_every", "2", "--train.lr", "5e-3"]
    run(None, args(tiny, run_dir, *common), metrics_hook=interrupt_at(2))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for bad, key in ((["--train.lr", "1e-3"], "train.lr"), (["--lora.r", "8"], "lora.r"),
                     (["--model.path", "default"], "model.path")):
        with pytest.raises(ConfigError) as e:
            run(None, ["--output.dir", str(run_dir), *bad], resume=True)
        msg = str(e.value)
        assert msg.startswith(f"--resume: {key}=") and "saved config.yaml" in msg and "\n" not in msg
    # weights that do not load (a damaged checkpoint): still nothing in the run dir changes
    (run_dir / "checkpoints" / "step-000002" / ADAPTER[0] / ADAPTER[1]).unlink()
    with pytest.raises(Exception):
        run(None, ["--output.dir", str(run_dir), "--train.max_steps", "9"], resume=True)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_resume_needs_output_dir():
    with pytest.raises(ConfigError, match="--resume needs the run to continue"):
        run(None, [], resume=True)


def test_extending_max_steps_keeps_taken_lrs_and_continues_without_jump(tiny, tmp_path, capsys):
    run_dir = tmp_path / "r"
    run(None, args(tiny, run_dir, "--train.max_steps", "6", "--train.save_every", "3", "--train.lr", "1e-3"))
    lr6 = [r["lr"] for r in records(run_dir)]
    capsys.readouterr()
    run(None, ["--output.dir", str(run_dir), "--train.max_steps", "12"], resume=True)
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "train.max_steps 6 -> 12" in ln]
    assert "continues from the last step's" in line and "decays (cosine) to 0 at step 12" in line
    lrs = [r["lr"] for r in records(run_dir)]
    assert len(lrs) == 12 and lrs[:6] == lr6  # the steps taken keep their lr
    f = lr6[-1] / 1e-3  # the rule of LrSchedule.extend: decay from the last lr over steps 6..12
    want = [1e-3 * f * 0.5 * (1 + math.cos(math.pi * (s - 5) / 7)) for s in range(6, 12)]
    assert lrs[6:] == pytest.approx(want, rel=1e-12)
    assert all(b <= a for a, b in zip(lrs[5:], lrs[6:]))  # no jump (it went 2e-4 -> 1.5e-3 before)


def test_lr_schedule_extension_rule():
    s = LrSchedule(10, 4, "linear")
    s.extend(3, 20)  # still in warmup: same warmup, decay over the new total
    assert [s.factor(i) for i in range(20)] == [lr_factor(i, 20, 4, "linear") for i in range(20)]
    s = LrSchedule(10, 2, "linear")
    taken = [s.factor(i) for i in range(6)]
    s.extend(6, 11)
    assert [s.factor(i) for i in range(5)] == taken[:5] and s.factor(5) == taken[5]
    assert [s.factor(i) for i in range(5, 11)] == pytest.approx([taken[5] * (1 - k / 6) for k in range(6)])
    c = LrSchedule(5, 0, "constant")
    c.extend(5, 9)
    assert all(c.factor(i) == 1.0 for i in range(9))
    st = s.state_dict()
    t = LrSchedule(1, 0, "cosine")
    t.load_state_dict(st)
    assert [t.factor(i) for i in range(11)] == [s.factor(i) for i in range(11)]


# ------------------------------------------------------------------ crash debris
KILL_DURING_SAVE = r"""
import os, signal, sys, torch
real = torch.save
def save(obj, f, *a, **k):  # the second checkpoint (step 4) dies half-written: kill -9
    if str(f).endswith("trainer_state.pt") and "step-000004" in str(f):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
from fastft.train.cli import run
run(None, sys.argv[1:])
"""


def test_kill9_during_save_then_resume_leaves_no_temp_folder(tiny, tmp_path):
    run_dir = tmp_path / "r"
    a = args(tiny, run_dir, "--train.max_steps", "6", "--train.save_every", "2")
    p = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *a], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    root = run_dir / "checkpoints"
    debris = [x.name for x in root.iterdir() if x.name.startswith(".step-000004.")]
    assert debris, "the kill did not leave the half-written folder this test is about"
    s = run(None, ["--output.dir", str(run_dir)], resume=True)
    assert s["steps"] == 6
    left = [x.name for x in list(root.iterdir()) + list(run_dir.iterdir()) if x.name.startswith(".")]
    assert left == []


def test_later_saves_remove_only_fastft_debris(tmp_path):
    from fastft.train import checkpoint as ck

    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    (root / ".step-000009.ab_cd123").mkdir()
    (root / ".step-000009.ab_cd123" / "junk").write_bytes(b"0" * 100)
    (tmp_path / "run" / ".final.x1y2z3w4").mkdir()
    (root / ".bestqwertyui").write_text("x")
    keep = [root / ".step-keep", root / "notes", tmp_path / "run" / ".git"]
    for k in keep:
        k.mkdir()
    model = torch.nn.Linear(2, 2)
    ck.save_checkpoint(root, 3, _Saveable(model), None, False, {"optimizer": {}})
    names = sorted(x.name for x in root.iterdir()) + sorted(x.name for x in (tmp_path / "run").iterdir())
    assert names == sorted([".step-keep", "notes", "step-000003"]) + sorted([".git", "checkpoints"])


def test_resaving_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    """Re-saving an existing step swaps the folders: a crash at the rename must leave a complete
    step-000003 (the old code deleted it first, then renamed: a kill in between lost both)."""
    from fastft import atomic_files
    from fastft.train import checkpoint as ck

    root = tmp_path / "run" / "checkpoints"
    model = _Saveable(torch.nn.Linear(2, 2))
    ck.save_checkpoint(root, 3, model, None, False, {"optimizer": {}, "tag": "old"})
    with torch.no_grad():
        model.inner.weight.add_(1.0)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed at the rename")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(atomic_files.shutil, "rmtree", crash)  # killed before the old copy is gone
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(root, 3, model, None, False, {"optimizer": {}, "tag": "new"})
    monkeypatch.undo()
    step = root / "step-000003"
    assert torch.load(step / "trainer_state.pt")["tag"] == "new"
    w = load_file(str(step / "model" / "model.safetensors"))["inner.weight"]
    assert torch.equal(w, model.inner.weight.detach())
    ck.remove_debris(root.parent)  # the old copy under its temp name is debris now
    assert sorted(x.name for x in root.iterdir()) == ["step-000003"]


def test_replace_dir_without_atomic_exchange_keeps_a_copy(tmp_path, monkeypatch):
    from fastft import atomic_files

    src, dst = tmp_path / ".new", tmp_path / "final"
    for d, text in ((src, "new"), (dst, "old")):
        d.mkdir()
        (d / "f").write_text(text)
    monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)
    atomic_files.replace_dir(src, dst)
    assert (dst / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


class _Saveable(torch.nn.Module):
    """A model with save_pretrained, enough for save_checkpoint's non-LoRA path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(path) / "model.safetensors"))


# ------------------------------------------------------------------ best model
def scripted_metric(values):
    """A metrics hook reporting ``score`` = values[step] (the early-stopping metric of these tests)."""
    def hook(model, tok, data, step):
        return {"score": values[step]}
    return hook


def test_early_stopping_final_holds_the_best_weights(tiny, tmp_path, capsys):
    run_dir = tmp_path / "r"
    scores = {0: 9.0, 2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5}  # best at step 4, then two bad evals: stop at 8
    s = run(None, args(tiny, run_dir, "--train.max_steps", "40", "--train.eval_every", "2", "--train.lr", "1e-2",
                       "--train.early_stopping_patience", "2", "--train.early_stopping_metric", "score",
                       "--train.keep_last", "1"), metrics_hook=scripted_metric(scores))
    assert s["stopped_early"] and s["steps"] == 8 and s["best_step"] == 4 and s["best"] == 1.0
    root = run_dir / "checkpoints"
    assert (root / "best").read_text().strip() == "step-000004"
    best, last = adapter_weights(root / "step-000004"), adapter_weights(root / "step-000008")
    assert not same(best, last)
    assert same(adapter_weights(run_dir / "final"), best)  # final/ = the best, not the last
    evals = {r["step"]: r for r in records(run_dir, "eval")}
    assert s["eval_after"]["eval_loss"] == evals[4]["eval_loss"]
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("held-out loss before:")]
    assert f"after: {evals[4]['eval_loss']:.4f}" in line and "best, step 4" in line and "last, step 8" in line


def test_end_of_run_evaluation_counts_for_best(tiny, tmp_path):
    run_dir = tmp_path / "r"
    scores = {0: 9.0, 2: 3.0, 4: 2.0, 6: 1.0}  # the final evaluation (step 6) is the best
    s = run(None, args(tiny, run_dir, "--train.max_steps", "6", "--train.eval_every", "2", "--train.lr", "1e-2",
                       "--train.early_stopping_patience", "3", "--train.early_stopping_metric", "score"),
            metrics_hook=scripted_metric(scores))
    assert s["best_step"] == 6 and s["best"] == 1.0 and not s["stopped_early"]
    root = run_dir / "checkpoints"
    assert (root / "best").read_text().strip() == "step-000006"
    assert same(adapter_weights(run_dir / "final"), adapter_weights(root / "step-000006"))


def test_load_best_at_end_off_keeps_the_last_weights(tiny, tmp_path):
    run_dir = tmp_path / "r"
    s = run(None, args(tiny, run_dir, "--train.max_steps", "40", "--train.eval_every", "2", "--train.lr", "1e-2",
                       "--train.early_stopping_patience", "1", "--train.early_stopping_metric", "score",
                       "--train.load_best_at_end", "false"), metrics_hook=scripted_metric({0: 5, 2: 1, 4: 2}))
    assert s["steps"] == 4 and s["best_step"] == 2
    assert same(adapter_weights(run_dir / "final"), adapter_weights(run_dir / "checkpoints" / "step-000004"))


# ------------------------------------------------------------------ divergence guard
def non_finite_on_disk(run_dir):
    """(file, tensor) pairs holding NaN/inf among every safetensors and .pt file under run_dir."""
    from fastft.train.checkpoint import first_non_finite

    bad = []
    for f in Path(run_dir).rglob("*"):
        if f.suffix == ".safetensors":
            name = first_non_finite(load_file(str(f)))
        elif f.suffix == ".pt":
            name = first_non_finite(torch.load(f, map_location="cpu", weights_only=False))
        else:
            continue
        if name:
            bad.append((str(f), name))
    return bad


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_huge_lr_stops_with_exit_3_and_nothing_non_finite_on_disk(tiny, tmp_path, capsys, mode):
    from fastft.cli import main

    run_dir = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        main(["train"] + args(tiny, run_dir, "--train.lr", "1e8", "--train.max_steps", "40", "--train.save_every",
                              "1", "--finetune.mode", mode, "--lora.target_modules", "q_proj,v_proj,down_proj"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3
    assert err.startswith("error: training diverged:") and "\n" not in err and "train.lr" in err
    assert not (run_dir / "final").exists()
    assert non_finite_on_disk(run_dir) == []
    recs = records(run_dir)
    assert all(r["bad"] for r in recs[-5:]) and not recs[-6]["bad"] and recs[-1]["bad_steps_total"] >= 5
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert newest.name == f"step-{recs[-6]['step']:06d}"  # the last good step; no bad step was saved


def _nan_grad_run(tiny, tmp_path, nan_steps, *extra):
    """Train LoRA with the gradient of one adapter matrix replaced by NaN during ``nan_steps``."""
    from fastft.config import load_config
    from fastft.train.cli import build
    from fastft.train.trainer import Trainer

    run_dir = tmp_path / "r"
    cfg = load_config(None, args(tiny, run_dir, "--train.max_steps", "8", "--train.lr", "1e-2", *extra))
    model, tok, bundle, device = build(cfg)
    run_dir.mkdir()
    trainer = Trainer(cfg, run_dir, model, tok, bundle, device)
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    p.register_hook(lambda g: g * float("nan") if trainer.step + 1 in nan_steps else g)
    history = {}

    def step_and_record(orig=trainer.train_step):
        rec = orig()
        history[trainer.step] = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
        return rec
    trainer.train_step = step_and_record
    return trainer, history, run_dir


def test_injected_nan_gradient_is_skipped_and_training_goes_on(tiny, tmp_path):
    trainer, history, run_dir = _nan_grad_run(tiny, tmp_path, {3})
    s = trainer.train()
    assert s["steps"] == 8
    assert all(torch.equal(history[2][n], history[3][n]) for n in history[2])  # step 3 changed nothing
    assert not all(torch.equal(history[3][n], history[4][n]) for n in history[3])
    assert all(torch.isfinite(v).all() for h in history.values() for v in h.values())
    rec = {r["step"]: r for r in records(run_dir)}
    assert rec[3]["bad"] and not rec[2]["bad"] and not rec[4]["bad"] and math.isnan(rec[3]["grad_norm"])
    assert non_finite_on_disk(run_dir) == []


def test_injected_nan_gradients_in_a_row_stop_the_run(tiny, tmp_path):
    trainer, history, run_dir = _nan_grad_run(tiny, tmp_path, set(range(3, 99)), "--train.max_bad_steps", "3",
                                              "--train.save_every", "1", "--train.max_grad_norm", "0")
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.train()
    assert trainer.step == 5 and all(torch.equal(history[2][n], history[5][n]) for n in history[2])
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))[-1] == "step-000002"
    assert non_finite_on_disk(run_dir) == []


def test_saving_a_non_finite_tensor_is_refused(tmp_path):
    from fastft.train import checkpoint as ck

    model = _Saveable(torch.nn.Linear(2, 2))
    with torch.no_grad():
        model.inner.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="inner.weight holds NaN or inf"):
        ck.save_checkpoint(tmp_path / "c", 1, model, None, False, {"optimizer": {}})
    assert list((tmp_path / "c").iterdir()) == []


# ------------------------------------------------------------------ plots
def test_curves_png_at_end_of_run_and_fastft_plot(tiny, tmp_path, capsys, monkeypatch):
    import matplotlib.image

    from fastft.train import plot
    from fastft.cli import main

    run_dir = tmp_path / "r"
    run(None, args(tiny, run_dir, "--train.max_steps", "4", "--train.eval_every", "2"))
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    png.unlink()
    main(["plot", str(run_dir)])
    assert png.is_file() and f"wrote {png}" in capsys.readouterr().out
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    png.unlink()
    main(["plot", str(run_dir)])
    assert capsys.readouterr().out.strip() == plot.NO_MATPLOTLIB and not png.exists()
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path)])
    assert e.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------ messages (issue 19, point 8)
@pytest.mark.parametrize("key, want", [
    ("train.learning_rate", "did you mean 'train.lr'?"),  # was: train.early_stopping_patience
    ("train.gradient_accumulation_steps", "did you mean 'train.grad_accum'?"),
    ("train.foo", None),  # was: "did you mean 'train.lr'" (the shared "train." prefix matched)
    ("lora.rr", "did you mean 'lora.r'?"),
    ("trian.lr", "did you mean 'train.lr'?"),
    ("lr", "did you mean 'train.lr'?"),
])
def test_unknown_key_suggestions(key, want):
    from fastft.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, [f"--{key}", "1"])
    msg = str(e.value)
    assert msg.startswith(f"unknown config key {key!r}")
    assert (want in msg) if want else ("did you mean" not in msg)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    from fastft.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  max_steps: [1, 2\nlora:\n  r: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert msg == f"{p}:4:5: invalid YAML (expected ',' or ']', but got ':')"


def test_missing_value_before_another_flag():
    from fastft.config import load_config
    from fastft.train.cli import split_args

    config, overrides, _, _ = split_args(["--train.lr", "--output.dir", "x"])
    with pytest.raises(ConfigError, match=r"^override --train\.lr needs a value$"):
        load_config(config, overrides)


def test_null_field_is_called_null_not_missing(tmp_path):
    from fastft.config import DataConfig
    from fastft.data import load_file
    from fastft.errors import DataError
    from transformers import AutoTokenizer

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b", "completion": "c"}\n{"prompt": "d", "completion": null}\n')
    tok = AutoTokenizer.from_pretrained(str(make_tiny_model(tmp_path / "m", vocab_words=50)))
    cfg = DataConfig(format="prompt_completion", drop_empty=False, cache=False)
    with pytest.raises(DataError) as e:
        load_file(str(data), "prompt_completion", tok, cfg)
    assert "row 1: column(s) ['completion'] are null" in str(e.value) and "needs column" not in str(e.value)
    ex, counts = load_file(str(data), "prompt_completion", tok, DataConfig(format="prompt_completion", cache=False))
    assert len(ex) == 1 and counts["dropped_empty"] == 1  # drop_empty (the default) drops and counts it


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "lora"
    run(None, args(tiny, run_dir, "--train.max_steps", "2", "--train.save_every", "2"))
    return run_dir


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    run(None, args(tiny, run_dir, "--train.max_steps", "2", "--finetune.mode", "full", "--model.dtype", "fp32"))
    return run_dir


def test_eval_accepts_run_folders(tiny, lora_run, full_run, tmp_path):
    from fastft.train.eval_cli import run_eval

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b", "completion": "c"}\n')
    from fastft.models.generate import merge_adapter  # noqa: F401
    via_adapter = run_eval(str(tiny), str(data), "prompt_completion", adapter=str(lora_run / "final" / "adapter"))
    for m in (lora_run, lora_run / "final", lora_run / "checkpoints" / "step-000002"):
        assert run_eval(str(m), str(data), "prompt_completion")["eval_loss"] == via_adapter["eval_loss"]
    direct = run_eval(str(full_run / "final" / "model"), str(data), "prompt_completion")
    for m in (full_run, full_run / "final"):  # was: "Should have a model_type key"
        assert run_eval(str(m), str(data), "prompt_completion")["eval_loss"] == direct["eval_loss"]


def test_eval_messages_name_eval_options(tiny, tmp_path, capsys):
    from fastft.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b", "completion": "c"}\n{not json\n')
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tiny), "--data", str(data), "--format", "prompt_completion"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--on-bad-line skip" in err and "data.on_bad_line" not in err
    main(["eval", "--model", str(tiny), "--data", str(data), "--format", "prompt_completion", "--on-bad-line", "skip"])
    assert "examples=1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tiny), "--data", str(data), "--adapter", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "<run>/final/adapter" in err and "<run>/adapter " not in err


# ------------------------------------------------------------------ int8 base weights
MEMORY_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
def status(key):
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
import torch, transformers
from transformers.models.llama import modeling_llama  # import-time transients before the baseline
from fastft.train.cli import run
from fastft.data import build_datasets
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the peak from here on
base = status("VmRSS")
s = run(None, sys.argv[3:])
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "delta": peak - base, "steps": s["steps"]}))
"""


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A Llama whose linear weights dominate its memory: 10 layers of 1024x2816, vocab ~1000,
    ~128M linear params (256 MB in bf16, 128 MB in int8), saved in bf16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = make_tiny_model(tmp_path_factory.mktemp("wide") / "model")
    tok = AutoTokenizer.from_pretrained(str(folder))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=True)
    cfg.num_hidden_layers = 10
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_int8_base_peak_memory_below_bf16(wide_model, tmp_path):
    """Peak RSS growth of a whole LoRA run (load, train, save) above the imported process:
    int8 below bf16, as the issue asks, with a margin for allocator noise: <= 0.95x. Measured on
    this 10-layer model: x0.67 (helper's run) and x0.87 (a fresh-clone CI run, 294 vs 339 MB);
    before the streaming loader x1.35, when the int8 run held the bf16 model, its int8 copy and
    fragmented temporaries at once. The <= 0.8x target is for the default run and lives in the
    benchmark (benchmarks/bench_int8_memory.py), not here."""
    out = {}
    for name in ("bf16", "int8"):  # one process each: peak RSS is per process
        a = ["--model.path", str(wide_model), "--model.dtype", "bf16", "--lora.int8_base", str(name == "int8").lower(),
             "--output.dir", str(tmp_path / f"{name}-{len(out.get(name, []))}"), "--train.progress", "false",
             "--output.tensorboard", "false", "--train.batch_size", "2", "--data.max_length", "32",
             "--train.max_steps", "2", "--train.eval_batches", "1", "--data.cache", "false"]
        p = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(REPO), "x", *a], env=child_env(),
                           capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-2000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
        assert res["steps"] == 2
        out.setdefault(name, []).append(res["delta"])
    b, i = min(out["bf16"]), min(out["int8"])
    assert i <= 0.95 * b, f"int8 run grew {i:.0f} MB, bf16 {b:.0f} MB (x{i / b:.2f})"


def test_run_releases_the_model_before_plotting(tiny, tmp_path, monkeypatch):
    """The curves are drawn after the run's model (with its optimizer, trainer and recipe) is
    released: matplotlib's import and figure (~25 MB) then reuse that memory instead of raising
    the whole process's peak RSS (issue 19 compares whole-process peaks). Was: all alive until
    run() returned, and the plot raised both runs' peak by 24 MB on SmolLM2."""
    import weakref

    import fastft.train.plot as plot
    from fastft.train.recipe import Recipe

    refs = []
    adapt, make_trainer, draw = Recipe.adapt, Recipe.make_trainer, plot.write_curves

    def spy_adapt(self, *a, **k):
        m = adapt(self, *a, **k)
        refs.extend([weakref.ref(m), weakref.ref(self)])
        return m

    def spy_trainer(self, *a, **k):
        t = make_trainer(self, *a, **k)
        refs.append(weakref.ref(t))
        return t

    alive = []

    def check(*a, **k):
        alive.extend(r() is not None for r in refs)
        return draw(*a, **k)

    monkeypatch.setattr(Recipe, "adapt", spy_adapt)
    monkeypatch.setattr(Recipe, "make_trainer", spy_trainer)
    monkeypatch.setattr(plot, "write_curves", check)
    s = run(None, args(tiny, tmp_path / "r", "--train.max_steps", "2"))
    assert s["steps"] == 2 and len(refs) == 3
    assert alive == [False] * 3, f"alive when plotting (model, recipe, trainer): {alive}"


def test_param_table_counts_int8_weights(tiny):
    from fastft.config import load_config
    from fastft.train.finetune import param_table
    from fastft.models.lora import trainable_parameters_line
    from fastft.train.cli import build

    for int8 in ("false", "true"):
        cfg = load_config(None, args(tiny, "unused", "--lora.int8_base", int8, "--model.dtype", "bf16"))
        model = build(cfg)[0]
        line = trainable_parameters_line(model)
        total = int(line.split("all params: ")[1].split(" ")[0].replace(",", ""))
        trainable = int(line.split("trainable params: ")[1].split(" ")[0].replace(",", ""))
        last = param_table(model).splitlines()[-1].split()
        assert last[0] == "total" and int(last[1].replace(",", "")) == trainable
        assert int(last[2].replace(",", "")) == total, (int8, line, last)
