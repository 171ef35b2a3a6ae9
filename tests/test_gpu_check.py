"""benchmarks/gpu_check.sh and benchmarks/gpu_check_report.py without a GPU: argument handling,
the early exit on a machine with no GPU, the whole orchestration with a stand-in Python (fake GPU,
pip, pytest and bench), the time budget, and the report built from fake inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check_report as rep  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(*args, env=None, timeout=120):
    e = {**os.environ, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=e, timeout=timeout,
                          cwd=str(ROOT))


def test_help_and_bad_arguments():
    r = _run("--help")
    assert r.returncode == 0 and "Usage: bash benchmarks/gpu_check.sh [REPORT_DIR]" in r.stdout
    r = _run("a", "b")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "at most one argument" in r.stderr
    r = _run("--fast")
    assert r.returncode == 2 and "unknown option --fast" in r.stderr
    r = _run(env={"GPU_CHECK_BUDGET_S": "8min"})
    assert r.returncode == 2 and "GPU_CHECK_BUDGET_S=8min" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_exits_2_before_anything_expensive(tmp_path):
    r = _run(str(tmp_path / "rep"))
    assert r.returncode == 2 and "no CUDA GPU visible" in r.stderr
    assert not (tmp_path / "rep").exists()


FAKE_PY = r'''#!/usr/bin/env bash
# Stand-in for the GPU machine's python: answers the GPU query, fakes pip/pytest/bench/env.
log="$FAKE_LOG"; echo "$*" >> "$log"
if [ "$1" = "-c" ]; then
  case "$2" in
    *get_device_properties*) echo "Fake H100|90|81559|2.11.0+cu130|13.0"; exit 0 ;;
    *describe*) echo '{"transformers": "5.17", "triton": "3.6", "peft": "0.x", "built": {"fastft._C_cuda (cuda)": ["adamw"]}, "ops_by_device": {"attention": "cpu: cpu; cuda: torch = PyTorch SDPA"}}'; exit 0 ;;
  esac
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then sleep "${FAKE_INSTALL_S:-0}"; echo "installed"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
  for a in "$@"; do case "$a" in --junitxml=*) x="${a#--junitxml=}";; esac; done
  fails=0; case "$3" in *test_backend_choice*) fails=1;; esac
  echo "<testsuites><testsuite name=\"pytest\" tests=\"3\" failures=\"$fails\" errors=\"0\" skipped=\"1\" time=\"1.5\"><testcase classname=\"tests.x\" name=\"test_a\"/>$( [ $fails = 1 ] && echo '<testcase classname="tests.x" name="test_b"><failure message="boom"/></testcase>')</testsuite></testsuites>" > "$x"
  exit $fails
fi
if [ "$1" = "-m" ] && [ "$2" = "fastft.cli" ]; then
  out=""; mode=""; prev=""
  for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; [ "$prev" = "--mode" ] && mode="$a"; prev="$a"; done
  mkdir -p "$out"
  echo "{\"args\": {\"mode\": \"$mode\", \"device\": \"cuda\"}, \"hf\": {\"tokens_per_s\": 10000.0, \"median_step_s\": 0.8, \"peak_gpu_mb\": 40000, \"mfu\": 0.3}, \"fastft\": {\"tokens_per_s\": 16000.0, \"median_step_s\": 0.5, \"peak_gpu_mb\": 20000, \"mfu\": 0.48}, \"ratios\": {\"tokens_per_s\": 1.6}, \"loss_check\": {\"ok\": true}}" > "$out/results.json"
  exit 0
fi
exec "$REAL_PY" "$@"
'''


@pytest.fixture
def fake_python(tmp_path):
    py = tmp_path / "fakepy"
    py.write_text(FAKE_PY)
    py.chmod(0o755)
    log = tmp_path / "calls.log"
    return {"PYTHON": str(py), "FAKE_LOG": str(log), "REAL_PY": sys.executable}, log


def test_whole_run_with_a_fake_gpu(tmp_path, fake_python):
    env, log = fake_python
    out = tmp_path / "report"
    r = _run(str(out), env={**env, "GPU_CHECK_TESTS": "tests/test_ops_devices.py tests/test_backend_choice.py"})
    assert r.returncode == 0, r.stderr + r.stdout
    calls = log.read_text()
    assert "-m pip install --no-build-isolation --no-deps -e ." in calls
    assert "--device cuda --model-config" in calls and "llama-3.2-1b.json --mode lora" in calls
    assert "--mode full" in calls and "--batch 8 --seq 1024" in calls
    for stage in ("install:", "env:", "test-test_ops_devices:", "bench-lora:", "bench-full:"):
        assert stage in r.stdout  # timings printed per stage
    machine = json.loads((out / "machine.json").read_text())
    assert machine["archs"] == "90" and machine["gpu"] == "Fake H100"
    md = (out / "REPORT.md").read_text()
    assert "Fake H100" in md and "| test_ops_devices.py | PASS | 2 | 0 | 1 |" in md
    assert "| test_backend_choice.py | FAIL |" in md and "FAILED test_backend_choice.py::x::test_b" in md
    assert "| lora | fastft | 16000 | 0.500 | 20000 | 48.0% | agree |" in md
    assert "- lora: tokens/s x1.60, peak memory x0.50" in md and "- attention: cpu: cpu; cuda: torch = PyTorch SDPA" in md
    assert "| test-test_backend_choice | failed |" in md  # the stage records the failure too


def test_budget_skips_late_stages(tmp_path, fake_python):
    env, log = fake_python
    out = tmp_path / "report"
    r = _run(str(out), env={**env, "GPU_CHECK_BUDGET_S": "21", "FAKE_INSTALL_S": "2",
                            "GPU_CHECK_TESTS": "tests/test_ops_devices.py"})
    assert r.returncode == 0, r.stderr
    assert "SKIPPED (out of time)" in r.stdout
    md = (out / "REPORT.md").read_text()
    assert "| bench-full | skipped | 0 | out of time" in md and "| full | (no results) |" in md


def test_report_from_partial_inputs(tmp_path):
    """Missing pieces are reported as missing; an RSS-only bench is labelled as such."""
    (tmp_path / "bench-full").mkdir()
    (tmp_path / "bench-full" / "results.json").write_text(json.dumps({
        "hf": {"tokens_per_s": 100.0, "median_step_s": 1.0, "peak_rss_mb": 3000.0, "mfu": 0.1},
        "fastft": {"tokens_per_s": 150.0, "median_step_s": 0.7, "peak_rss_mb": 2000.0, "mfu": 0.15},
        "ratios": {"tokens_per_s": 1.5}, "loss_check": {"ok": False}}))
    (tmp_path / "junit-test_x.xml").write_text("<testsuite tests='2' failures='0' errors='1' skipped='0' time='3'>"
                                               "<testcase classname='t' name='a'><error/></testcase></testsuite>")
    assert rep.main([str(tmp_path), "--total-seconds", "500"]) == 0
    md = (tmp_path / "REPORT.md").read_text()
    assert "OVER the 480 s budget" in md and "| (no stages.tsv) | missing |" in md
    assert "| test_x.py | FAIL | 1 | 1 | 0 | 3 |" in md
    assert "| full | fastft | 150 | 0.700 | 2000 (peak_rss_mb) | 15.0% | DISAGREE |" in md
    assert "| lora | (no results) |" in md and "- (no env.json)" in md
    assert rep.main([str(tmp_path / "nope")]) == 2
    # env.json is the env stage's log: warnings around the JSON object
    (tmp_path / "env.json").write_text('UserWarning: x\n{"ops_by_device": {"swiglu": "cpu: cpu; cuda: triton"}}\nbye\n')
    assert rep.main([str(tmp_path)]) == 0
    assert "- swiglu: cpu: cpu; cuda: triton" in (tmp_path / "REPORT.md").read_text()
