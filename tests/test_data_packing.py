"""Packing: packed and unpacked batches give the same loss and gradients on a tiny Llama,
because position ids restart per sample and attention stays inside each sample: through Hugging
Face's attention with the block-diagonal mask, and through fastft's fused decoder layers and
segment-aware attention kernels with no mask at all (LoRA and full fine-tuning, fp32 and bf16).
Leaky variants (samples that see each other) fail the same checks."""
from __future__ import annotations

import pytest
import torch

from _data_util import tiny_llama, tiny_tokenizer
from fastft.data.chat import encode_rows
from fastft.data.collate import Collator
from fastft.data.packing import IGNORE, PackedCollator, pack_examples
from fastft.errors import DataError
from fastft.ops.segments import block_causal_mask


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


def test_collator_hands_positions_and_cu_seqlens_not_a_mask():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}]
    b = PackedCollator(0, cu_seqlens=True)(rows)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # the pad tail counts up
    assert b["cu_seqlens"].tolist() == [0, 3, 5, 7, 10]  # samples 3, 2 | 2, pad tail 3
    assert b["cu_seqlens"].dtype == torch.int32


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_and_grads_equal_unpacked(attn):
    tok, exs = _examples()
    model = tiny_llama(attn=attn)
    unpacked = Collator(tok.pad_token_id)(exs)
    packed_rows = pack_examples(exs, 64)
    packed = PackedCollator(tok.pad_token_id)(packed_rows)
    assert packed["attention_mask"].dim() == 2  # the collator hands position ids, no 4-D mask
    # HF's own attention needs the block mask built from them
    packed["attention_mask"] = block_causal_mask(packed["position_ids"], packed["attention_mask"])
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


def test_packing_through_the_trainer_gives_the_unpacked_first_step_loss(tmp_path, monkeypatch, capsys):
    """`fastft train` with data.packing: one step over the whole set (one batch) has the same
    loss packed and unpacked, so the trainer really keeps samples apart; ``tokens`` counts the
    same real tokens both ways (no padding), and the startup line says the rows are packed."""
    import json

    from trainer_helpers import bundled_rows, make_tiny_model, write_jsonl

    from fastft.train.cli import run

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
        losses[packing] = (train[0]["loss"], train[0]["target_tokens"], train[0]["tokens"])
        out = capsys.readouterr().out
        assert ("packed rows (<= " in out) == (packing == "true"), out
    assert losses["true"][1] == losses["false"][1]
    assert losses["true"][2] == losses["false"][2]  # real tokens only, padding excluded both ways
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Packed rows through fastft's fused decoder layers / segment-aware attention (no mask at all)
# ------------------------------------------------------------------------------------------------
def _fastft_model(mode: str, dtype: torch.dtype):
    """tiny_llama (SDPA) in ``dtype``: ``lora`` = frozen base + LoRA on q/v (the fused-layer path),
    ``full`` = every weight trainable (per-op path, attention still fastft's)."""
    from fastft.models.lora import inject_lora

    model = tiny_llama(attn="sdpa").to(dtype).train()
    if mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        inject_lora(model, target_modules=["q_proj", "v_proj"], r=4, alpha=8.0, verbose=False)
        with torch.no_grad():  # B starts at zero, which would make every dA zero
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.1)
    return model


def _loss_and_grads(model, batch):
    from fastft.train.utils import CausalLMLoss

    model.zero_grad(set_to_none=True)
    loss, n = CausalLMLoss(model)(**batch)
    loss.backward()
    return loss.detach().float(), int(n), {k: p.grad.float().clone() for k, p in model.named_parameters()
                                           if p.grad is not None}


def _max_errs(got, ref):
    loss, _, grads = got
    rloss, _, rgrads = ref
    return [abs(loss.item() - rloss.item()) / abs(rloss.item())] + [
        ((grads[k] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for k, g in rgrads.items()]


def _agrees(got, ref, exact) -> list[str]:
    """The names (loss, gradients) where ``got`` misses the reference: fp32 (``exact`` None)
    equal up to summation order; bf16 within 2x the HF bf16 model's own error against fp32."""
    if exact is None:
        bad = [] if torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-6) else ["loss"]
        return bad + [k for k, g in ref[2].items() if not torch.allclose(got[2][k], g, rtol=1e-4, atol=1e-6)]
    ours, theirs = _max_errs(got, exact), _max_errs(ref, exact)
    return [name for name, a, b in zip(["loss", *exact[2]], ours, theirs) if a > 2 * b + 2e-2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_packed_rows_through_fused_layers_equal_unpacked(mode, dtype, monkeypatch):
    """Packed rows through patch_blocks (fused layers for LoRA, per-op layers for full fine-tuning,
    fastft's attention with the rows' segments in both) give the unpacked batch's loss and
    gradients; the reference is the unpacked batch on the unpatched HF model. fp32: equal up to
    summation order; bf16: within 2x the error the unpatched bf16 model itself makes against the
    fp32 reference (plus a floor). Nothing leaves the fused paths because of packing."""
    import copy

    from fastft.models import hf_fast

    tok, exs = _examples()
    unpacked = Collator(tok.pad_token_id)(exs)
    packed = PackedCollator(tok.pad_token_id)(pack_examples(exs, 64))
    assert bool((packed["attention_mask"] == 0).any())  # a pad tail is in there too
    model = _fastft_model(mode, dtype)
    hf_ref = copy.deepcopy(model)  # never patched: HF's own attention
    fp32_ref = copy.deepcopy(model).float()
    hf_fast.patch_blocks(model)
    assert hf_fast.routes_attention(model) and not hf_fast.routes_attention(hf_ref)
    before = hf_fast.fallbacks(model)
    got = _loss_and_grads(model, packed)
    after = hf_fast.fallbacks(model)
    assert after["attention"] == before["attention"]  # every attention call took the segments
    if mode == "lora":  # the fused decoder layers ran (full fine-tuning trains the weights: per-op)
        assert after["layer"] == before["layer"]
    ref = _loss_and_grads(hf_ref, unpacked)
    assert got[1] == ref[1]  # the same target tokens
    assert set(got[2]) == set(ref[2])
    exact = None if dtype == torch.float32 else _loss_and_grads(fp32_ref, unpacked)
    assert _agrees(got, ref, exact) == []
    # the leaky variant: per-sample positions (RoPE) kept, but each row handed to the attention as
    # one sample (+ its pad tail), so samples see their predecessors: the same check fails
    from fastft.models import loss as model_loss  # attention_inputs lives with the loss

    real = model_loss.segments_from_position_ids
    monkeypatch.setattr(model_loss, "segments_from_position_ids",
                        lambda pos, mask=None: real(torch.arange(pos.shape[1]).expand_as(pos), mask))
    leak = _loss_and_grads(model, packed)
    assert _agrees(leak, ref, exact)  # loss or gradients miss (a random model's loss barely moves in bf16)


def test_packed_batch_runs_the_fused_layers_and_builds_no_mask(monkeypatch):
    """A packed LoRA batch: every decoder layer runs as one fused node with the rows' segments,
    no layer or attention call falls back, and no (B, 1, T, T) mask is built (HF's mask builder
    and fastft's block mask would raise here)."""
    from transformers import masking_utils

    from fastft.models import fused_layer, hf_fast
    from fastft.models import loss as model_loss

    tok, exs = _examples()
    packed = PackedCollator(tok.pad_token_id)(pack_examples(exs, 64))
    model = _fastft_model("lora", torch.float32)
    hf_fast.patch_blocks(model)
    seen = []
    real = hf_fast.fused_layer_forward

    def counting(plan, h, pe, segments=None):
        seen.append(segments)
        return real(plan, h, pe, segments)

    def boom(*a, **k):
        raise AssertionError("a (B, 1, T, T) mask was built")

    monkeypatch.setattr(hf_fast, "fused_layer_forward", counting)
    monkeypatch.setattr(masking_utils, "sdpa_mask", boom)
    monkeypatch.setattr(model_loss, "block_causal_mask", boom)
    monkeypatch.setattr(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping",
                        {k: boom for k in masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping})
    _loss_and_grads(model, packed)
    assert len(seen) == model.config.num_hidden_layers
    assert all(s is not None and s.shape == tuple(packed["input_ids"].shape) for s in seen)
    assert hf_fast.fallbacks(model) == {"layer": 0, "attention": 0}
    assert fused_layer is not None


def test_unrouted_model_gets_the_block_mask_and_says_so():
    """Attention not routed through fastft (no patch_blocks): packed rows must still not leak;
    they get the block mask (warned once) and the unpacked loss."""
    from fastft.train import utils as train_utils

    tok, exs = _examples()
    model = _fastft_model("full", torch.float32)
    unpacked = Collator(tok.pad_token_id)(exs)
    packed = PackedCollator(tok.pad_token_id)(pack_examples(exs, 64))
    train_utils._WARNED.discard("packed")
    with pytest.warns(RuntimeWarning, match="block mask"):
        got = _loss_and_grads(model, packed)
    ref = _loss_and_grads(model, unpacked)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_keeps_packed_rows_apart():
    """Checkpointed layers are recomputed in backward, outside the forward's segment context: such
    a model must take the block-mask path (said once), and its packed gradients equal unpacked."""
    import copy

    from fastft.models import hf_fast
    from fastft.train import utils as train_utils

    tok, exs = _examples()
    model = _fastft_model("full", torch.float32)
    ref_model = copy.deepcopy(model)
    hf_fast.patch_blocks(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert not hf_fast.routes_attention(model)
    train_utils._WARNED.discard("packed")
    with pytest.warns(RuntimeWarning, match="gradient checkpointing"):
        got = _loss_and_grads(model, PackedCollator(tok.pad_token_id)(pack_examples(exs, 64)))
    ref = _loss_and_grads(ref_model, Collator(tok.pad_token_id)(exs))
    assert _agrees(got, ref, None) == []
