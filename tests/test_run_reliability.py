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
from fastft.train_cli import run
from fastft.train_utils import LrSchedule, lr_factor
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
from fastft.train_cli import run
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
    from fastft import checkpoint as ck

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


class _Saveable(torch.nn.Module):
    """A model with save_pretrained, enough for save_checkpoint's non-LoRA path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(Path(path) / "model.safetensors"))
