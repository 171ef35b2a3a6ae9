"""Packing: packed and unpacked batches give the same loss and gradients on a tiny Llama,
because position ids restart per sample and the block-diagonal mask stops cross-sample attention."""
from __future__ import annotations

import pytest
import torch

from _data_util import tiny_llama, tiny_tokenizer
from fastft.data.chat import encode_rows
from fastft.data.collate import Collator
from fastft.data.packing import IGNORE, PackedCollator, block_causal_mask, pack_examples
from fastft.errors import DataError


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py: tiny models run on one thread
    yield


def _examples():
    tok = tiny_tokenizer()
    rows = [{"prompt": f"What is {i} + {i + 1}?", "completion": f" {2 * i + 1}." + " Paris is in France." * (i % 4)}
            for i in range(9)]
    return tok, encode_rows(rows, "prompt_completion", tok)


@pytest.mark.parametrize("strategy", ["ffd", "sequential"])
def test_pack_examples_layout(strategy):
    _, exs = _examples()
    rows = pack_examples(exs, 48, strategy)
    assert len(rows) < len(exs)
    assert all(len(r["input_ids"]) <= 48 for r in rows)
    # Every sample appears once, position ids restart at 0, and the first label of each sample is masked.
    pieces = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE
            pieces.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a + 1:b])))
    expected = [(tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in exs]
    assert sorted(pieces) == sorted(expected)
    if strategy == "sequential":
        assert [p[0] for p in pieces] == [p[0] for p in expected]
    with pytest.raises(DataError, match="apply data.excess_length before packing"):
        pack_examples(exs, 5)


def test_block_causal_mask_small_case():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0]])
    allowed = block_causal_mask(pos, att) == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0, 0], expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_grads_equal_unpacked(attn):
    tok, exs = _examples()
    model = tiny_llama(attn=attn)
    unpacked = Collator(tok.pad_token_id)(exs)
    packed_rows = pack_examples(exs, 64)
    packed = PackedCollator(tok.pad_token_id)(packed_rows)
    assert packed["input_ids"].numel() < unpacked["input_ids"].numel()
    assert (packed["labels"] != IGNORE).sum() == (unpacked["labels"][:, 1:] != IGNORE).sum()

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    lu, gu = loss_and_grads(unpacked)
    lp, gp = loss_and_grads(packed)
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp, gu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Without the block mask the samples see each other and the loss changes: the mask matters.
    leaky = Collator(tok.pad_token_id)(packed_rows)
    assert abs(model(**leaky).loss.item() - lu.item()) > 1e-4


def test_packing_through_the_trainer_gives_the_unpacked_first_step_loss(tmp_path, monkeypatch):
    """`fastft train` with data.packing: one step over the whole set (one batch) has the same
    loss packed and unpacked, so the trainer really uses the block-mask collator."""
    import json

    from trainer_helpers import bundled_rows, make_tiny_model, write_jsonl

    from fastft.train_cli import run

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "d.jsonl", bundled_rows(24))
    losses = {}
    for packing in ("false", "true"):
        run_dir = tmp_path / f"run_{packing}"
        run(None, ["--model.path", str(model), "--model.dtype", "fp32", "--data.train_file", str(data),
                   "--data.val_ratio", "0", "--data.packing", packing, "--train.batch_size", "32",
                   "--train.max_steps", "1", "--train.progress", "false", "--output.tensorboard", "false",
                   "--output.dir", str(run_dir), "--finetune.mode", "full"])
        train = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"train"' in line]
        losses[packing] = (train[0]["loss"], train[0]["target_tokens"])
    assert losses["true"][1] == losses["false"][1]
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-5)
