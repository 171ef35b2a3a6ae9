"""``fastft bench`` end to end on a tiny random Llama: both sides really train in their own
processes; the outputs exist and are well-formed; the loss-agreement check passes when both
sides train alike and fails (exit 1, FAIL line) when the fastft side trains with a 10x lr."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from trainer_helpers import make_tiny_model


def _bench_args(tmp_path, out_name: str, *extra: str) -> list[str]:
    """``fastft bench`` arguments (after ``bench``) for a tiny, fast comparison."""
    return ["--model", str(tmp_path / "tiny"), "--mode", "full", "--batch", "2", "--seq", "32", "--steps", "3",
            "--warmup", "1", "--rounds", "1", "--lr", "2e-3", "--out", str(tmp_path / out_name),
            "--history", str(tmp_path / "history.csv"), *extra]


def _bench(tmp_path, out_name: str, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "fastft.cli", "bench", *_bench_args(tmp_path, out_name, *extra)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_tiny_model(root / "tiny")
    return root


@pytest.mark.slow
def test_bench_outputs_and_loss_agreement(tiny):
    p = _bench(tiny, "ok")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "PASS: loss curves agree" in p.stdout
    for word in ("machine:", "fastft backends:", "bf16 GEMM rate", "fastft/HF: tokens/s"):
        assert word in p.stdout
    res = json.loads((tiny / "ok" / "results.json").read_text())
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        # each side as its users run it: the fastft command's huge pages, HF stock (fastft/runtime.py)
        assert res["fastft"]["settings"]["malloc"] == "huge pages"
        assert res["hf"]["settings"]["malloc"] == "default"
    for side in ("hf", "fastft"):
        s = res[side]
        assert len(s["losses"]) == 4  # warmup + steps, one loss per optimizer step
        assert len(s["step_times"]) == 3 and all(t > 0 for t in s["step_times"])
        assert s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 50 and 0 < s["mfu"] < 1
    assert res["hf"]["settings"]["optim"] == "adamw_torch_fused"
    assert res["loss_check"]["ok"] is True
    hf_t, ff_t = res["hf"]["step_times"], res["fastft"]["step_times"]  # one round: ratio of its medians
    assert res["ratios"]["tokens_per_s"] == pytest.approx(sorted(hf_t)[1] / sorted(ff_t)[1])
    # both sides saw the same batches from the same weights: the first losses agree closely
    assert abs(res["hf"]["losses"][0] - res["fastft"]["losses"][0]) < 0.01 * res["hf"]["losses"][0]
    png = (tiny / "ok" / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = list(csv.DictReader(open(tiny / "history.csv")))
    assert len(rows) == 1 and rows[0]["mode"] == "full" and rows[0]["loss_ok"] == "True"


@pytest.mark.slow
def test_bench_without_matplotlib_finishes_and_says_how_to_get_plots(tiny):
    from fastft.plot import NO_MATPLOTLIB

    code = "import sys; sys.modules['matplotlib'] = None; from fastft.cli import main; main(sys.argv[1:])"
    args = [sys.executable, "-c", code, "bench", *_bench_args(tiny, "nompl", "--history", str(tiny / "h2.csv"))]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]  # it crashed at the very end before
    assert "Traceback" not in p.stderr and (tiny / "nompl" / "results.json").is_file()
    assert not (tiny / "nompl" / "plot.png").exists()
    assert NO_MATPLOTLIB.replace("fastft plot RUN_DIR", "rerun for plot.png") in p.stdout


@pytest.mark.slow
def test_bench_fails_loudly_when_loss_curves_disagree(tiny):
    # a real run of the fastft side with a 10x learning rate, not a mocked curve
    p = _bench(tiny, "bad", "--fastft-override", "train.lr=2e-2")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "FAIL: loss curves disagree" in p.stdout
    res = json.loads((tiny / "bad" / "results.json").read_text())
    assert res["loss_check"]["ok"] is False
    hf, ff = res["hf"]["losses"], res["fastft"]["losses"]
    assert abs(hf[0] - ff[0]) < 0.01 * hf[0]  # same start; the curves part only after updates
    rows = list(csv.DictReader(open(tiny / "history.csv")))
    assert rows[-1]["loss_ok"] == "False"


def test_loss_check_unit():
    from fastft.bench import loss_check

    ok, _ = loss_check([3.0, 2.9, 2.8], [3.001, 2.905, 2.79], 0.01, 0.03)
    assert ok
    ok, msg = loss_check([3.0, 2.9, 2.8], [3.001, 2.5, 2.2], 0.01, 0.03)
    assert not ok and "step 3" in msg
    ok, msg = loss_check([3.0, 2.9], [3.0], 0.01, 0.03)
    assert not ok and "points" in msg


def test_model_flops_per_token():
    from types import SimpleNamespace

    from fastft.bench import model_flops_per_token

    cfg = SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=16, vocab_size=10, head_dim=4)
    macs = 8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16 + 8 * 10
    attn = 3 * 4 * 1 * 8 * 32
    assert model_flops_per_token(cfg, 32, "full") == 6 * macs + attn
    assert model_flops_per_token(cfg, 32, "lora") == 4 * macs + attn


@pytest.mark.slow
def test_bench_int8_runs_hf_on_bitsandbytes(tiny):
    """--mode int8: the HF side loads its base through bitsandbytes' LLM.int8 (the stock int8
    path), the fastft side through its own int8 base; both train and the curves agree."""
    pytest.importorskip("bitsandbytes")
    args = [sys.executable, "-m", "fastft.cli", "bench", "--model", str(tiny / "tiny"), "--mode", "int8",
            "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1", "--rounds", "1",
            "--out", str(tiny / "int8"), "--history", str(tiny / "history8.csv")]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "int8 base via bitsandbytes" in p.stdout and "PASS: loss curves agree" in p.stdout
    res = json.loads((tiny / "int8" / "results.json").read_text())
    assert any("bitsandbytes" in n for n in res["hf"]["notes"])
