"""``fastft search``: space files, samplers, pruning, failures, outputs, resume after kill -9,
two workers on one journal, and that a trial trains exactly what ``fastft train`` trains.

Real Optuna, real journal storage, a tiny random Llama (tests/trainer_helpers.py) and budgets
of a few steps; the subprocess tests (kill -9, two workers, fresh ``fastft train``) are slow.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

optuna = pytest.importorskip("optuna")

from fastft.search import run  # noqa: E402
from trainer_helpers import bundled_rows, make_tiny_model, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(folder / "model")
    data = write_jsonl(folder / "train.jsonl", bundled_rows(48))
    return model, data


def base_cfg(tiny, mode="lora", steps=4, **train) -> dict:
    model, data = tiny
    return {"model": {"path": str(model), "dtype": "fp32"},
            "finetune": {"mode": mode},
            "data": {"train_file": str(data), "max_length": 64, "val_ratio": 0.25},
            "train": {"max_steps": steps, "eval_every": 2, "batch_size": 4, "progress": False, "lr": 3e-3,
                      **train},
            "output": {"tensorboard": False}}


def cli_args(tiny, mode="lora", steps=4) -> list[str]:
    out = []
    for sec, body in base_cfg(tiny, mode, steps).items():
        for k, v in body.items():
            out += [f"--{sec}.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def fastft_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "fastft.cli", *map(str, args)]


def final_eval(run_dir: Path, metric="eval_loss") -> float:
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    return [r for r in rows if r["event"] == "eval"][-1][metric]


# ------------------------------------------------------------------------------------------ space
BAD_SPACES = [
    ("train.lrr: {type: float, low: 1e-5, high: 1e-3}", "did you mean 'train.lr'"),
    ("lr: {type: float, low: 1e-5, high: 1e-3}", "unknown key 'lr'"),
    ("train.lr: {type: float, low: 1e-3, high: 1e-5}", "must be below high"),
    ("train.lr: {type: float, low: 0, high: 1e-3, log: true}", "log=true needs low > 0"),
    ("train.lr: {type: uniform, low: 0, high: 1}", "expected one of float, int, categorical"),
    ("train.lr: {type: float, low: 1e-5}", "needs 'high'"),
    ("train.lr: {type: float, low: 1e-5, high: 1e-3, stp: 2}", "unknown field(s) stp"),
    ("lora.r: {type: float, low: 2, high: 8}", "integer key: use type int"),
    ("lora.r: {type: int, low: 0, high: 8}", "lora.r low=0"),
    ("lora.r: {type: categorical, choices: [4, 0]}", "choice 0"),
    ("lora.r: {type: categorical, choices: []}", "non-empty list"),
    ("lora.target_modules: {type: int, low: 1, high: 2}", "use type categorical"),
    ("train.dropout_rate: 3", "unknown config key"),
    ("train.lr: [1, 2]", "expected a mapping with 'type'"),
    ("metric: accuracy\ntrain.lr: {type: float, low: 1e-5, high: 1e-3}", "metric='accuracy'"),
    ("direction: sideways\ntrain.lr: {type: float, low: 1e-5, high: 1e-3}", "direction='sideways'"),
    ("metric: eval_loss", "no parameter to search"),
    ("train.lr: {type: float, low: 1e-5, high: [", "invalid YAML"),
]


@pytest.mark.parametrize("text,needle", BAD_SPACES)
def test_bad_space_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, text, needle):
    from fastft.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(text + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["search", "--space", str(space), "--out", str(out), *cli_args(tiny)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["--sampler", "grid"], "continuous float range"),
    (["--trials", "0"], "--trials 0"),
    (["--storage", "redis://localhost"], "expected an Optuna RDB URL"),
    (["--metric", "macro_f1"], "metric='macro_f1'"),
    (["--data.train_file", "/nonexistent/train.jsonl"], "file not found"),
    (["--model.path", "/nonexistent/model"], "model.path"),
])
def test_bad_arguments_one_line_exit_2(tiny, tmp_path, capsys, argv, needle):
    from fastft.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["search", "--space", str(space), "--out", str(out), *cli_args(tiny), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_torchrun_is_refused_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    from fastft.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}\n")
    with pytest.raises(SystemExit) as e:
        main(["search", "--space", str(space), "--out", str(tmp_path / "out"), *cli_args(tiny)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "torchrun" in err
    assert not (tmp_path / "out").exists()


def test_space_parsing_details(tiny):
    from fastft.config import from_dict
    from fastft.search.space import load_space

    base = from_dict(base_cfg(tiny))
    sp = load_space({"train": {"lr": {"type": "float", "low": "1e-5", "high": 1e-3, "log": True}},
                     "train.warmup_steps": {"type": "int", "low": 0, "high": 3, "step": 1},
                     "lora.target_modules": {"type": "categorical", "choices": [["q_proj", "v_proj"], ["o_proj"]]}},
                    base)
    assert (sp.metric, sp.direction) == ("eval_loss", "minimize")
    assert sp.params["train.lr"].low == 1e-5  # YAML 1.1 reads 1e-5 as a string
    assert sp.params["lora.target_modules"].choices == ["q_proj,v_proj", "o_proj"]
    assert sp.params["train.warmup_steps"].grid() == [0, 1, 2, 3]
    cls = from_dict({**base_cfg(tiny), "data": {"format": "classification"}})
    assert load_space({"metric": "macro_f1", "train.lr": {"type": "categorical", "choices": [1e-3]}},
                      cls).direction == "maximize"


# ---------------------------------------------------------------------------------------- samplers
def test_grid_visits_exactly_the_grid_and_writes_outputs(tiny, tmp_path):
    space = {"lora.r": {"type": "categorical", "choices": [2, 4]},
             "train.lr": {"type": "categorical", "choices": [1e-3, 3e-3]}}
    lines = []
    study = run(base_cfg(tiny), space, sampler="grid", out=tmp_path / "s", pruner="none", log=lines.append)
    visited = [(t.params["lora.r"], t.params["train.lr"]) for t in study.trials]
    assert sorted(visited) == sorted(itertools.product([2, 4], [1e-3, 3e-3]))
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    rows = read_csv(tmp_path / "s" / "trials.csv")
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert [float(r["eval_loss"]) for r in rows] == [t.value for t in study.trials]
    assert all(r["steps"] == "4" for r in rows)
    # one progress line per trial, naming the parameters, the metric and the best so far
    progress = [ln for ln in lines if ln.startswith("trial ")]
    assert len(progress) == 4 and all("eval_loss" in ln and "best" in ln and "lora.r=" in ln for ln in progress)
    best = min(study.trials, key=lambda t: t.value)
    text = (tmp_path / "s" / "best.yaml").read_text()
    assert f"best trial {best.number}" in text
    import yaml

    cfg = yaml.safe_load(text)
    assert cfg["lora"]["r"] == best.params["lora.r"] and cfg["train"]["lr"] == best.params["train.lr"]
    for name in ("optimization_history", "parallel_coordinate", "param_importances"):
        assert (tmp_path / "s" / "plots" / f"{name}.png").stat().st_size > 1000
    for t in study.trials:  # every trial keeps its config and metrics
        assert (tmp_path / "s" / "trials" / f"{t.number:04d}" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_reproducible_from_seed(tiny, tmp_path, sampler):
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "lora.r": {"type": "int", "low": 2, "high": 8, "step": 2}}
    cfg = base_cfg(tiny, steps=2)
    a = run(cfg, space, sampler=sampler, trials=3, seed=7, out=tmp_path / "a", pruner="none", plots=False,
            log=lambda s: None)
    b = run(cfg, space, sampler=sampler, trials=3, seed=7, out=tmp_path / "b", pruner="none", plots=False,
            log=lambda s: None)
    c = run(cfg, space, sampler=sampler, trials=3, seed=8, out=tmp_path / "c", pruner="none", plots=False,
            log=lambda s: None)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.value for t in a.trials] == [t.value for t in b.trials]
    assert [t.params for t in a.trials] != [t.params for t in c.trials]


# ------------------------------------------------------------------------------- pruning, failures
def _enqueue(out: Path, lrs: list[float], direction="minimize"):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out.mkdir(parents=True)
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))),
                                study_name="search", direction=direction)
    for lr in lrs:
        study.enqueue_trial({"train.lr": lr})


def test_pruning_stops_an_absurd_learning_rate_early(tiny, tmp_path):
    """Full fine-tuning with lr=50 gives a held-out loss ~1e5 at the first evaluation: the
    median pruner stops it there (steps 2 of 6), while sane trials run to the end."""
    space = {"train.lr": {"type": "categorical", "choices": [1e-3, 2e-3, 50.0]}}
    _enqueue(tmp_path / "s", [1e-3, 2e-3, 50.0])  # the absurd one last, after two finished trials
    study = run(base_cfg(tiny, mode="full", steps=6), space, sampler="grid", out=tmp_path / "s",
                pruner=optuna.pruners.MedianPruner(n_startup_trials=1), plots=False, log=lambda s: None)
    states = {t.params["train.lr"]: t for t in study.trials}
    assert states[50.0].state.name == "PRUNED"
    assert states[50.0].last_step == 2 and states[50.0].user_attrs["steps"] == 2
    assert states[1e-3].state.name == states[2e-3].state.name == "COMPLETE"
    assert states[1e-3].user_attrs["steps"] == 6
    row = [r for r in read_csv(tmp_path / "s" / "trials.csv") if r["train.lr"] == "50.0"][0]
    assert row["state"] == "pruned" and row["pruned_step"] == "2"


def test_diverging_trial_fails_with_reason_and_is_never_best(tiny, tmp_path):
    space = {"train.lr": {"type": "categorical", "choices": [1e30, 1e-3]}}
    _enqueue(tmp_path / "s", [1e30, 1e-3])
    lines = []
    study = run(base_cfg(tiny, mode="full", steps=4), space, sampler="grid", out=tmp_path / "s", pruner="none",
                plots=False, log=lines.append)
    bad = [t for t in study.trials if t.params["train.lr"] == 1e30][0]
    reason = bad.user_attrs["fail_reason"]  # the trainer skips non-finite steps; the eval then sees NaN
    assert bad.state.name == "FAIL" and reason.startswith("diverged: ") and "nan" in reason
    assert study.best_trial.params["train.lr"] == 1e-3 and math.isfinite(study.best_value)
    assert any("failed: diverged" in ln for ln in lines)
    assert "1e-3" in (tmp_path / "s" / "best.yaml").read_text() or "0.001" in (tmp_path / "s" / "best.yaml").read_text()


def test_early_stopping_still_stops_a_trial(tiny, tmp_path):
    # min_delta 100: the second evaluation (step 4) never counts as better -> stop there, of 10
    cfg = base_cfg(tiny, steps=10, early_stopping_patience=1, early_stopping_min_delta=100.0)
    study = run(cfg, {"lora.r": {"type": "categorical", "choices": [2]}}, sampler="grid", out=tmp_path / "s",
                pruner="none", plots=False, log=lambda s: None)
    (t,) = study.trials
    assert t.state.name == "COMPLETE" and t.user_attrs["steps"] == 4
    assert sorted(t.intermediate_values) == [0, 2, 4]  # step 0 is evaluated when early stopping needs it


def test_classification_metric_maximised(tiny, tmp_path):
    """The objective can be any metric the evaluation computes: macro-F1 of a new head on the
    bundled sentiment set, maximised."""
    model, _ = tiny
    cfg = {"model": {"path": str(model), "dtype": "fp32", "fused_ce": False}, "finetune": {"mode": "full"},
           "data": {"format": "classification", "max_length": 32, "label_names": ["negative", "neutral", "positive"]},
           "train": {"max_steps": 2, "eval_every": 1, "batch_size": 8, "progress": False},
           "output": {"tensorboard": False}}
    space = {"metric": "macro_f1", "train.lr": {"type": "categorical", "choices": [1e-3, 1e-2]}}
    study = run(cfg, space, sampler="grid", out=tmp_path / "s", pruner="none", plots=False, log=lambda s: None)
    assert study.direction.name == "MAXIMIZE"
    assert all(t.state.name == "COMPLETE" and 0.0 <= t.value <= 1.0 for t in study.trials)
    assert study.best_value == max(t.value for t in study.trials)
    assert read_csv(tmp_path / "s" / "trials.csv")[0].keys() >= {"macro_f1"}


def test_out_of_memory_trial_fails_and_the_study_goes_on(tiny, tmp_path, monkeypatch):
    from fastft.search import objective

    real = objective.SearchTrainer.train_step

    def oom_for_rank_4(self):
        if self.cfg.lora.r == 4:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB")
        return real(self)

    monkeypatch.setattr(objective.SearchTrainer, "train_step", oom_for_rank_4)
    space = {"lora.r": {"type": "categorical", "choices": [4, 2]}}
    study = run(base_cfg(tiny, steps=2), space, sampler="grid", out=tmp_path / "s", pruner="none", plots=False,
                log=lambda s: None)
    by_r = {t.params["lora.r"]: t for t in study.trials}
    assert by_r[4].state.name == "FAIL" and by_r[4].user_attrs["fail_reason"].startswith("out of memory")
    assert by_r[2].state.name == "COMPLETE"


def test_rdb_url_storage_and_timeout(tiny, tmp_path):
    """Any Optuna RDB URL works (SQLite here; PostgreSQL/MySQL are the same code); --timeout
    stops starting trials."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    study = run(base_cfg(tiny, steps=2), space, sampler="random", trials=50, timeout=0.5, storage=url,
                out=tmp_path / "s", pruner="none", plots=False, log=lambda s: None)
    assert isinstance(study, optuna.Study)
    again = optuna.load_study(study_name="search", storage=url)
    assert 1 <= len(again.trials) < 50 and all(t.state.name == "COMPLETE" for t in again.trials)
    assert not (tmp_path / "s" / "study.journal").exists()
    assert len(read_csv(tmp_path / "s" / "trials.csv")) == len(again.trials)


def test_rerun_with_another_space_is_refused(tiny, tmp_path, capsys):
    from fastft.cli import main

    run(base_cfg(tiny, steps=2), {"lora.r": {"type": "categorical", "choices": [2]}}, sampler="grid",
        out=tmp_path / "s", plots=False, log=lambda s: None)
    space = tmp_path / "space.yaml"
    space.write_text("lora.r: {type: categorical, choices: [2, 4]}\n")
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    with pytest.raises(SystemExit) as e:
        main(["search", "--space", str(space), "--out", str(tmp_path / "s"), *cli_args(tiny, steps=2)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "another space" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before


@pytest.mark.parametrize("low_memory", [False, True])
def test_builder_loads_once_or_reloads_when_memory_is_short(tiny, monkeypatch, low_memory):
    """Full fine-tuning trials copy the kept base weights (one load for the search); with too
    little free memory for a copy they reload instead, and say so once."""
    from fastft.config import from_dict
    from fastft.search import reuse

    if low_memory:
        monkeypatch.setattr(reuse, "_available_bytes", lambda: 1 << 20)
    lines = []
    builder = reuse.TrialBuilder(log=lines.append)
    cfg = from_dict(base_cfg(tiny, mode="full"))
    builder.preload(cfg)
    first = builder.build(cfg)[0]
    name, w = next((n, p) for n, p in first.named_parameters() if p.requires_grad)
    original = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # as if the trial had trained it
    second = builder.build(cfg)[0]
    assert torch.equal(dict(second.named_parameters())[name], original)  # the next trial starts from the base
    assert builder.reloads == (2 if low_memory else 1)  # preload, then (low memory) trial 2
    assert sum("reload the model" in ln for ln in lines) == (1 if low_memory else 0)


def test_plots_without_matplotlib_say_so_in_one_line(tmp_path, monkeypatch):
    from fastft.search.outputs import write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    lines = []
    assert write_plots(optuna.create_study(), tmp_path, lines.append) == []
    assert len(lines) == 1 and "matplotlib is not installed" in lines[0]


# ------------------------------------------------------------------ reuse == fresh `fastft train`
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trial_equals_fresh_fastft_train_and_best_yaml_reproduces(tiny, tmp_path, mode):
    """The second trial of a search runs on the model kept from the first (LoRA: adapters
    swapped; full: a copy of the kept base). ``fastft train`` in a fresh process with that
    trial's config must give the same held-out loss; so must ``fastft train best.yaml``."""
    space = ({"lora.r": {"type": "categorical", "choices": [2, 4]},
              "lora.dropout": {"type": "categorical", "choices": [0.1]}} if mode == "lora"
             else {"train.lr": {"type": "categorical", "choices": [1e-3, 3e-3]}})
    out = tmp_path / "s"
    study = run(base_cfg(tiny, mode=mode, steps=4), space, sampler="grid", out=out, pruner="none", plots=False,
                log=lambda s: None)
    second = study.trials[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(fastft_cmd("train", out / "trials" / "0001" / "config.yaml", "--output.dir",
                                  tmp_path / "fresh", "--train.threads", "1"),
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_eval(tmp_path / "fresh") == pytest.approx(second.value, rel=1e-6, abs=1e-7)
    p = subprocess.run(fastft_cmd("train", out / "best.yaml", "--train.threads", "1"), capture_output=True,
                       text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert final_eval(out / "best-run") == pytest.approx(study.best_value, rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------ resume and parallel workers
SPACE_YAML = "train.lr: {type: categorical, choices: [0.001, 0.002, 0.003, 0.004]}\n"


def _search_cmd(tiny, out: Path, space: Path, steps: int, *extra) -> list[str]:
    return fastft_cmd("search", "--space", space, "--out", out, "--sampler", "grid", "--pruner", "none",
                      "--no-plots", *extra, *cli_args(tiny, steps=steps), "--train.threads", "1")


def _load(out: Path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return optuna.load_study(study_name="search",
                             storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))


@pytest.mark.slow
def test_kill_9_then_rerun_continues_the_study(tiny, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE_YAML)
    out = tmp_path / "s"
    cmd = _search_cmd(tiny, out, space, 40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline = time.time() + 500
    try:  # wait for one finished trial and the next one running, then kill -9 mid-trial
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            if (out / "study.journal").is_file():
                states = [t.state.name for t in _load(out).trials]
                if states.count("COMPLETE") >= 1 and "RUNNING" in states:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the search did not reach its second trial")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {t.number: (t.params, t.value) for t in _load(out).trials if t.state.name == "COMPLETE"}
    running = [t for t in _load(out).trials if t.state.name == "RUNNING"]
    assert before and len(running) == 1
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "was interrupted" in p.stdout
    study = _load(out)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4  # the study completes N trials in total
    assert sorted(t.params["train.lr"] for t in done) == [0.001, 0.002, 0.003, 0.004]  # the grid, once
    assert {t.number: (t.params, t.value) for t in done if t.number in before} == before  # kept, not rerun
    killed = study.trials[running[0].number]
    assert killed.state.name == "FAIL" and killed.user_attrs["fail_reason"].startswith("interrupted")
    assert any(t.params == killed.params for t in done)  # retried with the same parameters
    rows = read_csv(out / "trials.csv")
    assert len(rows) == len(study.trials) and sum(r["state"] == "complete" for r in rows) == 4


@pytest.mark.slow
def test_two_workers_on_one_journal_share_the_trials(tiny, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE_YAML)
    out = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_search_cmd(tiny, out, space, 6), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-2000:]
    study = _load(out)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]  # N trials, none lost, none extra
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert sorted(t.params["train.lr"] for t in study.trials) == [0.001, 0.002, 0.003, 0.004]  # no duplicates
    workers = {t.user_attrs["fastft_worker"] for t in study.trials}
    assert len(workers) == 2  # both processes ran trials
    assert len(read_csv(out / "trials.csv")) == 4


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_and_queues_the_trial_again(tiny, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE_YAML)
    out = tmp_path / "s"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_search_cmd(tiny, out, space, 40), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tmp_path)
    deadline = time.time() + 500
    try:
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            trial_dir = out / "trials" / "0000"
            if (trial_dir / "metrics.jsonl").is_file():  # training has started
                break
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()[-2000:]
    study = _load(out)
    first = study.trials[0]
    assert first.state.name == "FAIL" and first.user_attrs["fail_reason"].startswith("interrupted (Ctrl-C)")
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert len(waiting) == 1 and waiting[0].params == first.params  # the rerun starts with it
