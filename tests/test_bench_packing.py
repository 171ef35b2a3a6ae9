"""fastft/bench/packing.py (``fastft bench --packing``) on tiny settings: it builds the packed,
padded and causal batches of the same samples, checks that packed, padded and HF's padding-free
losses agree before timing, and reports target tokens/s. No timing is asserted."""
from __future__ import annotations

import types

import pytest


@pytest.mark.slow
def test_step_comparison_runs_and_checks_losses(tmp_path, monkeypatch):
    from trainer_helpers import make_tiny_model

    from fastft.bench.packing import step

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    tiny = make_tiny_model(tmp_path / "tiny")
    args = types.SimpleNamespace(rows=2, seq=64, rounds=1, hf=True)
    text = step(args, ["--model.path", str(tiny), "--model.dtype", "fp32"])
    assert "| packed | 2x64 |" in text and "| hf | 1x" in text and "vs HF + PEFT padding-free" in text
    losses = text.split("Loss sums: ")[1].split(".\n")[0]
    vals = [float(x.split()[1]) for x in losses.split(", ")]
    assert len(vals) == 3 and max(vals) - min(vals) < 1e-3 * abs(vals[0])
