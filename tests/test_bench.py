"""``fastft bench`` end to end on a tiny random Llama: every side really trains in its own
process; both workloads run and their loss curves agree; rounds alternate ABBA; the children's
malloc setting and threads are recorded (and equal when asked); HF + torch.compile runs as a
baseline; ``--model-config`` builds a random model; the loss-agreement check fails (exit 1, FAIL
line) when the fastft side trains with a 10x lr; bad requests are one line and exit 2."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from trainer_helpers import make_tiny_model


def _bench(tmp_path, out_name: str, *extra: str, mode: str = "full") -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTFT_CACHE": str(tmp_path / "cache")}  # --model-config's random models go there
    args = [sys.executable, "-m", "fastft.cli", "bench", "--model", str(tmp_path / "tiny"), "--mode", mode,
            "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "2", "--lr", "2e-3",
            "--out", str(tmp_path / out_name), "--history", str(tmp_path / "history.csv"), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=1200, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_tiny_model(root / "tiny")
    return root


def _lines_of(stdout: str, workload: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith(f"[{workload}, ")]


@pytest.mark.slow
def test_bench_both_workloads_abba_same_malloc(tiny):
    """Both workloads, two rounds (ABBA), both sides with malloc on huge pages (--malloc huge)."""
    p = _bench(tiny, "ok", "--workload", "both", "--rounds", "2", "--malloc", "huge")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tiny / "ok" / "results.json").read_text())
    assert set(res["workloads"]) == {"instruction", "text"}
    fr = {w: res["workloads"][w]["data"]["target_fraction"] for w in res["workloads"]}
    assert 0.05 < fr["instruction"] < 0.6 and fr["text"] == 1.0  # text: every position is a target
    for wl, w in res["workloads"].items():
        # every printed line about a workload names it and its target fraction
        lines = _lines_of(p.stdout, wl)
        assert any(f"[{wl}, {fr[wl]:.0%} targets] PASS: loss curves agree" in ln for ln in lines), p.stdout
        assert any("headline: fastft x" in ln for ln in lines) and any("MFU = model-FLOPs utilisation" in ln
                                                                      for ln in lines)
        assert w["loss_ok"] is True and w["baselines"]["hf"]["loss_check"]["ok"] is True
        assert w["headline"]["speed_baseline"] == "hf"
        for side in ("hf", "fastft"):
            s = w["sides"][side]
            assert len(s["losses"]) == 4  # warmup + steps, one loss per optimizer step
            assert len(s["step_times"]) == 4 and all(t > 0 for t in s["step_times"])  # 2 rounds x 2 steps
            assert s["tokens_per_s"] > 0 and s["peak_mem_mb"] > 50 and 0 < s["mfu"] < 1
            assert s["memory_measure"] == "ru_maxrss"
            # the same setting in every child, as asked, and the same threads
            assert [x["malloc"] for x in s["settings_all_rounds"]] == ["huge pages"] * 2
            assert all("glibc.malloc.hugetlb=1" in x["glibc_tunables"] for x in s["settings_all_rounds"])
        assert w["process_settings"]["same_malloc"] and w["process_settings"]["same_threads"]
        # first losses agree closely: same weights, same batch
        hf_l, ff_l = w["sides"]["hf"]["losses"], w["sides"]["fastft"]["losses"]
        assert abs(hf_l[0] - ff_l[0]) < 0.01 * hf_l[0]
        # fastft's executed FLOPs: fewer than the model count exactly when not every position is a target
        if wl == "text":
            assert w["fastft_executed_flops_per_token"] == pytest.approx(w["model_flops_per_token"])
        else:
            assert w["fastft_executed_flops_per_token"] < w["model_flops_per_token"]
    # ABBA: round 1 runs HF first, round 2 fastft first (the children's result files say when they ran)
    w = "instruction"
    t = {f"{s}-{r}": (tiny / "ok" / f"{w}-{s}-{r}.json").stat().st_mtime for s in ("hf", "fastft") for r in (0, 1)}
    assert t["hf-0"] < t["fastft-0"] < t["fastft-1"] < t["hf-1"]
    for wl in ("instruction", "text"):
        png = (tiny / "ok" / f"plot-{wl}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = list(csv.DictReader(open(tiny / "history.csv")))
    assert {(r["workload"], r["baseline"], r["loss_ok"]) for r in rows} >= {("instruction", "hf", "True"),
                                                                           ("text", "hf", "True")}


@pytest.mark.slow
def test_bench_hf_compile_baseline_and_stock_malloc(tiny):
    """HF + torch.compile is measured as a baseline (compile time reported, not timed); with the
    default --malloc stock each side runs as its users get it and records what that was."""
    p = _bench(tiny, "compile", "--workload", "text", "--rounds", "1", "--hf-compile", mode="lora")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tiny / "compile" / "results.json").read_text())
    w = res["workloads"]["text"]
    assert set(w["sides"]) == {"hf", "hf_compile", "fastft"}
    assert w["sides"]["hf_compile"]["settings"]["torch_compile"] is True
    assert w["baselines"]["hf_compile"]["loss_check"]["ok"] is True
    assert len(w["sides"]["hf_compile"]["warmup_extra_s"]) == 1
    assert w["headline"]["speed_baseline"] in ("hf", "hf_compile")
    fastest = max(("hf", "hf_compile"), key=lambda b: w["sides"][b]["tokens_per_s"])
    assert w["headline"]["speed_baseline"] == fastest
    assert "compile (warm-up time beyond steady steps" in p.stdout
    assert "fastft vs HF + torch.compile: tokens/s x" in p.stdout
    settings = {s: w["sides"][s]["settings"] for s in w["sides"]}
    assert all("malloc" in v and "glibc_tunables" in v for v in settings.values())
    if sys.platform.startswith("linux"):
        # stock: the fastft command's huge pages on its side only (fastft/runtime.py)
        user = os.environ.get("GLIBC_TUNABLES", "")
        if "glibc.malloc.hugetlb" not in user and os.environ.get("FASTFT_HUGEPAGES", "1") != "0":
            assert settings["fastft"]["malloc"] == "huge pages"
            assert settings["hf"]["malloc"] == settings["hf_compile"]["malloc"] == "default"


@pytest.mark.slow
def test_bench_model_config_runs_end_to_end(tiny):
    """--model-config: a random-init model from a config.json; the rows use --model's tokenizer
    when the vocab sizes match."""
    cfg = json.loads((tiny / "tiny" / "config.json").read_text())
    small = {k: cfg[k] for k in ("model_type", "vocab_size", "num_attention_heads", "num_key_value_heads",
                                 "max_position_embeddings", "pad_token_id", "eos_token_id", "bos_token_id",
                                 "tie_word_embeddings")}
    small.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    (tiny / "cfg.json").write_text(json.dumps(small))
    p = _bench(tiny, "cfg", "--workload", "instruction", "--rounds", "1", "--device", "cpu",
               "--model-config", str(tiny / "cfg.json"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tiny / "cfg" / "results.json").read_text())
    assert res["model"]["source"].startswith("random init")
    assert res["workloads"]["instruction"]["data"]["ids"].startswith("tokenizer ids")
    assert res["workloads"]["instruction"]["loss_ok"] is True
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(res["model"]["folder"]).hidden_size == 32
    assert res["model"]["folder"].startswith(str(tiny / "cache" / "bench-random-init"))


def test_random_model_is_built_once_per_config_and_seed(tmp_path, monkeypatch):
    from fastft.bench.model import build_random_model, bundled_word_tokenizer

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    cfg = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    tok = bundled_word_tokenizer()
    a = build_random_model(str(tmp_path / "c.json"), tok, 0)
    stamp = os.stat(os.path.join(a, "model.safetensors")).st_mtime_ns
    assert build_random_model(str(tmp_path / "c.json"), tok, 0) == a  # reused, not rebuilt
    assert os.stat(os.path.join(a, "model.safetensors")).st_mtime_ns == stamp
    b = build_random_model(str(tmp_path / "c.json"), tok, 1)
    assert b != a  # another seed, another model
    import safetensors.torch as st

    wa, wb = st.load_file(os.path.join(a, "model.safetensors")), st.load_file(os.path.join(b, "model.safetensors"))
    assert not all((wa[k] == wb[k]).all() for k in wa if wa[k].dim() == 2)


@pytest.mark.slow
def test_bench_fails_loudly_when_loss_curves_disagree(tiny):
    # a real run of the fastft side with a 10x learning rate, not a mocked curve
    p = _bench(tiny, "bad", "--workload", "instruction", "--rounds", "1", "--fastft-override", "train.lr=2e-2")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "FAIL: loss curves disagree" in p.stdout
    res = json.loads((tiny / "bad" / "results.json").read_text())
    w = res["workloads"]["instruction"]
    assert w["loss_ok"] is False
    hf, ff = w["sides"]["hf"]["losses"], w["sides"]["fastft"]["losses"]
    assert abs(hf[0] - ff[0]) < 0.01 * hf[0]  # same start; the curves part only after updates
    rows = list(csv.DictReader(open(tiny / "history.csv")))
    assert rows[-1]["loss_ok"] == "False"


@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda"], "--device cuda: no CUDA device is available"),
    (["--hf-liger"], "--hf-liger: Liger's kernels are Triton GPU kernels"),
    (["--warmup", "1"], "--warmup"),
    (["--model-config", "/nonexistent/cfg.json"], "--model-config /nonexistent/cfg.json: file not found"),
])
def test_bench_refuses_in_one_line(tmp_path, extra, message):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = subprocess.run([sys.executable, "-m", "fastft.cli", "bench", "--out", str(tmp_path / "o"), *extra],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o" / "results.json").exists()


def test_child_env_malloc_choices():
    from fastft.bench.cli import child_env
    from fastft.runtime import ORIGINAL

    user = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    fastft_cmd = {**user, ORIGINAL: "glibc.malloc.arena_max=2",
                  "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}  # after the re-exec
    for env in (user, fastft_cmd):
        if sys.platform.startswith("linux"):
            assert "hugetlb=1" in child_env("fastft", "stock", env)["GLIBC_TUNABLES"]
        assert child_env("hf", "stock", env)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
        for side in ("hf", "hf_compile", "fastft"):
            assert child_env(side, "huge", env)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
            assert child_env(side, "default", env)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    # a user's explicit choice is kept by stock, and overridden only when asked for one setting
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert child_env("fastft", "stock", mine)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert "GLIBC_TUNABLES" not in child_env("fastft", "default", mine)


def test_round_order_is_abba():
    from fastft.bench.cli import round_order

    sides = ["hf", "hf_compile", "fastft"]
    assert round_order(sides, 0) == sides and round_order(sides, 1) == sides[::-1] and round_order(sides, 2) == sides


def test_loss_check_unit():
    from fastft.bench.cli import loss_check

    ok, _ = loss_check([3.0, 2.9, 2.8], [3.001, 2.905, 2.79], 0.01, 0.03)
    assert ok
    ok, msg = loss_check([3.0, 2.9, 2.8], [3.001, 2.5, 2.2], 0.01, 0.03)
    assert not ok and "step 3" in msg
    ok, msg = loss_check([3.0, 2.9], [3.0], 0.01, 0.03)
    assert not ok and "points" in msg


def test_model_and_executed_flops_per_token():
    from types import SimpleNamespace

    from fastft.bench.report import executed_flops_per_token, model_flops_per_token

    cfg = SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=16, vocab_size=10, head_dim=4)
    macs = 8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16 + 8 * 10
    attn = 3 * 4 * 1 * 8 * 32
    assert model_flops_per_token(cfg, 32, "full") == 6 * macs + attn
    assert model_flops_per_token(cfg, 32, "lora") == 4 * macs + attn
    # the head (8x10 MACs) runs on a quarter of the positions: three quarters of its FLOPs are not executed
    assert executed_flops_per_token(cfg, 32, "lora", 0.25) == 4 * macs + attn - 0.75 * 4 * 80
    assert executed_flops_per_token(cfg, 32, "full", 1.0) == model_flops_per_token(cfg, 32, "full")


def _record(step: float, mem: float, losses=(2.0, 1.9, 1.8, 1.7)) -> dict:
    return {"step_times": [9.0, 9.0, step, step], "tokens": [64] * 4, "peak_mem_mb": mem, "losses": list(losses),
            "memory_measure": "ru_maxrss", "settings": {"malloc": "default"}, "notes": [], "threads": 2}


def test_compare_headline_is_against_the_fastest_baseline():
    from fastft.bench.report import compare, summarise

    runs = {"hf": [_record(3.0, 2000)], "hf_compile": [_record(2.0, 2400)], "fastft": [_record(1.0, 1000)]}
    sides = {k: summarise(v, 2) for k, v in runs.items()}
    c = compare("cpu", "lora", "text", sides, runs, 2)
    assert c["baselines"]["hf"]["tokens_per_s"] == pytest.approx(3.0)
    assert c["baselines"]["hf_compile"]["tokens_per_s"] == pytest.approx(2.0)
    h = c["headline"]
    assert h["speed_baseline"] == "hf_compile" and h["tokens_per_s"] == pytest.approx(2.0)
    assert h["memory_baseline"] == "hf" and h["peak_mem"] == pytest.approx(0.5)  # the leanest baseline
    assert c["baselines"]["hf_compile"]["speed_target"] == 1.7 and c["baselines"]["hf_compile"]["speed_target_met"]
    assert sides["hf"]["warmup_extra_s"] == [pytest.approx(18.0 - 6.0)]
    runs["hf_compile"][0]["losses"] = [2.0, 1.5, 1.2, 1.0]
    sides = {k: summarise(v, 2) for k, v in runs.items()}
    assert compare("cpu", "lora", "text", sides, runs, 2)["loss_ok"] is False


def test_plot_without_matplotlib_is_one_line(monkeypatch, tmp_path):
    from fastft.bench.report import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    line = plot({"workloads": {}}, "text", tmp_path / "p.png")
    assert line.startswith("plot skipped: matplotlib is not installed") and not (tmp_path / "p.png").exists()


def test_history_keeps_old_rows_when_columns_change(tmp_path):
    from fastft.bench.report import append_history

    h = tmp_path / "h.csv"
    h.write_text("time,mode,speedup\n1,lora,2.0\n")
    append_history(h, [{"time": "2", "mode": "full", "workload": "text", "speedup": 1.5}])
    append_history(h, [{"time": "3", "mode": "full", "workload": "text", "speedup": 1.6}])
    rows = list(csv.DictReader(open(h)))
    assert [r["time"] for r in rows] == ["1", "2", "3"] and rows[0]["workload"] == "" and rows[2]["workload"] == "text"


def test_text_rows_are_all_targets_and_random_ids_keep_the_mask(tmp_path):
    import torch

    from fastft.bench.data import build_rows, randomize_ids
    from fastft.bench.model import bundled_word_tokenizer

    tok = bundled_word_tokenizer()
    st = build_rows("text", tok, 16, 6, 0, tmp_path / "t.pt")
    d = torch.load(tmp_path / "t.pt")
    assert st["target_fraction"] == 1.0 and torch.equal(d["input_ids"], d["labels"]) and d["input_ids"].shape == (6, 16)
    st = build_rows("instruction", tok, 16, 6, 0, tmp_path / "i.pt", model_vocab=50)
    d = torch.load(tmp_path / "i.pt")
    assert st["ids"].startswith("random token ids in [0, 50)") and 0 < st["target_fraction"] < 1
    assert int(d["input_ids"].max()) < 50
    keep = d["labels"] != -100
    assert torch.equal(d["labels"][keep], d["input_ids"][keep])
    ids = torch.arange(12).view(2, 6)
    lab = torch.tensor([[-100] * 3 + [1] * 3] * 2)
    new, new_lab = randomize_ids(ids, lab, 7, 0)
    assert torch.equal(new_lab == -100, lab == -100) and int(new.max()) < 7


def test_hf_liger_refusal_on_cuda_without_liger(monkeypatch):
    """On a CUDA machine without liger-kernel, --hf-liger is refused in one line (checked here by
    pretending CUDA is present; the flag itself needs a GPU)."""
    import importlib.util

    import click
    import torch

    from fastft.bench.cli import check_request

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(click.ClickException, match="liger-kernel is not installed"):
        check_request("cuda", True)
    check_request("cuda", False)  # plain --device cuda passes the check when CUDA is there
