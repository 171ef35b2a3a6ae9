"""The real embedded model (SmolLM2-135M-Instruct) on 2 gloo ranks: a 3-step LoRA run of 2 ranks
x batch 4 (DDP, and FSDP2 of the frozen base) ends with the same adapter as 1 process x batch 8
(fp32, dropout off, clipping active). Slow: two processes load the model (the dequantised
cache: ~2 s each once it exists)."""
from __future__ import annotations

import pytest
import torch

from test_distributed import HERE, W_TOL, LOSS_REL, spawn, wait_all
from test_trainer_smollm2 import needs_model

import dist_worker

pytestmark = [pytest.mark.slow, needs_model]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from fastft.models.loading import materialize

    model = materialize()  # build the HF cache once, before two processes race to
    out = tmp_path_factory.mktemp("smol") / "results.pt"
    wait_all(spawn([str(HERE / "dist_worker.py"), str(out), model, *SCEN]), timeout=1200)
    return model, torch.load(out, weights_only=False)


SCEN = ["smol_lora", "smol_fsdp_lora"]  # DDP, and FSDP2 of the frozen base with the adapters


@pytest.mark.parametrize("scenario", SCEN)
def test_two_rank_lora_on_smollm2_matches_one_rank(two_ranks, tmp_path, scenario):
    model, results = two_ranks
    two = results[scenario]
    one = dist_worker.run_scenario(model, scenario, 1, tmp_path / "one")
    assert two["strategy"] == ("ddp" if scenario == "smol_lora" else "fsdp")
    assert two["target_tokens"] == one["target_tokens"]
    assert all(g > 0.3 for g in one["grad_norm"])  # clipping active
    for a, b in zip(two["loss"], one["loss"]):
        assert a == pytest.approx(b, rel=LOSS_REL)
    assert len(two["weights"]) == len(one["weights"]) > 0
    for n in one["weights"]:
        torch.testing.assert_close(two["weights"][n], one["weights"][n], **W_TOL, msg=lambda m: f"{n}: {m}")
