"""The tied head/embedding gradient hand-off (fastft/ops/tied_embedding.py, fastft/models/loss.py):
the same loss and gradients as autograd's plain two-gradient path, with one (V, H) gradient
allocated in backward instead of two or three, and the plain path (said once) where it must stay."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastft.models.loss as loss_mod
from fastft.models.loss import CausalLMLoss
from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from fastft.ops.tied_embedding import TiedGrad, tied_embedding

from trainer_helpers import make_tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py: tiny models run on one thread
    yield


def _op_step(ids, w, lin, tied, padding_idx=None, by_freq=False, scale=0.37):
    """Embedding -> tanh(x @ lin) -> fused CE against the next id; returns (loss, w.grad, slot)."""
    w.grad = None
    slot = TiedGrad() if tied else None
    if tied:
        e = tied_embedding(ids, w, slot, padding_idx, by_freq)
    else:
        e = F.embedding(ids, w, padding_idx, None, 2.0, by_freq)
    h = torch.tanh(e @ lin.to(e.dtype))
    loss = fused_linear_cross_entropy(h[:, :-1], w, ids[:, 1:], reduction="sum",
                                      weight_grad_to=slot if tied and slot.armed else None)
    (loss * scale).backward()
    return loss.detach(), w.grad.clone(), slot


@pytest.mark.parametrize("padding_idx,by_freq", [(None, False), (5, False), (-3, False), (None, True), (7, True)])
@pytest.mark.parametrize("shape", [(3, 11), (1, 2), (2, 64)])
def test_op_bit_identical_to_plain_autograd(padding_idx, by_freq, shape):
    torch.manual_seed(0)
    V, H = 37, 24
    w = nn.Parameter(torch.randn(V, H))
    lin = torch.randn(H, H) / H ** 0.5
    ids = torch.randint(0, V, shape)
    ids[0, : max(1, shape[1] // 3)] = 5  # repeated ids (and the padding row) sum several rows
    ref = _op_step(ids, w, lin, False, padding_idx, by_freq)
    out = _op_step(ids, w, lin, True, padding_idx, by_freq)
    assert torch.equal(out[0], ref[0])
    assert torch.equal(out[1], ref[1])  # same kernels, same order of additions
    assert out[2].grad is None and out[2].armed  # handed over and taken


def test_op_bf16_weight_matches_plain():
    torch.manual_seed(1)
    V, H = 53, 32
    w = nn.Parameter(torch.randn(V, H).bfloat16())
    lin = torch.randn(H, H) / H ** 0.5
    ids = torch.randint(0, V, (2, 17))
    ref = _op_step(ids, w, lin, False)
    out = _op_step(ids, w, lin, True)
    assert out[1].dtype == torch.bfloat16
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1].float(), ref[1].float(), rtol=1.6e-2, atol=1e-2)


def test_without_head_grad_the_embedding_returns_its_dense_gradient():
    torch.manual_seed(2)
    w = nn.Parameter(torch.randn(11, 4))
    ids = torch.randint(0, 11, (2, 5))
    slot = TiedGrad()
    tied_embedding(ids, w, slot, 3).sum().backward()
    g = w.grad.clone()
    w.grad = None
    F.embedding(ids, w, 3).sum().backward()
    assert torch.equal(g, w.grad)
    with torch.no_grad():  # no backward node: the head must not hand its gradient over
        tied_embedding(ids, w, slot2 := TiedGrad())
    assert not slot2.armed


def _tied_tiny(folder):
    """The trainer tests' tiny Llama with its head tied to the embedding."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    make_tiny_model(folder)
    cfg = AutoModelForCausalLM.from_pretrained(folder).config
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied_tiny(tmp_path_factory):
    return _tied_tiny(tmp_path_factory.mktemp("tied") / "model")


@contextlib.contextmanager
def _plain_path(monkeypatch):
    """The code before the hand-off: autograd's two (V, H) gradients."""
    @contextlib.contextmanager
    def plain(lm, fused):
        yield None

    monkeypatch.setattr(loss_mod, "tied_head_grad", plain)
    yield
    monkeypatch.undo()


def _batches(V, n=2, B=2, T=23, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, V, (B, T), generator=g)
        labels = ids.clone()
        labels[0, :5] = -100  # a masked prompt
        out.append((ids, torch.ones_like(ids), labels))
    return out


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    crit = CausalLMLoss(model)
    losses = []
    for ids, mask, labels in batches:  # gradient accumulation over the micro-batches
        ls, n = crit(ids, mask, labels)
        (ls / 97.0).backward()
        losses.append(ls.detach())
    return torch.stack(losses), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_causal_lm_loss_tied_model_same_loss_and_grads_with_accumulation(tied_tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_tiny, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batches = _batches(model.config.vocab_size)
    with _plain_path(monkeypatch):
        ref_loss, ref_g = _loss_and_grads(model, batches)
    loss, g = _loss_and_grads(model, batches)
    assert torch.equal(loss, ref_loss)
    assert ref_g.keys() == g.keys()
    for k in g:
        assert torch.equal(g[k], ref_g[k]), k
    assert "forward" not in vars(model.model.embed_tokens)  # the swap is undone


class _CountVH(TorchDispatchMode):
    """Counts fresh (V, H) float tensors made by ops (outputs that share no storage with an input)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.fresh = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if (isinstance(o, torch.Tensor) and tuple(o.shape) == self.shape and o.is_floating_point()
                    and o.untyped_storage().data_ptr() not in ins):
                self.fresh += 1
        return out


def test_one_vocab_sized_gradient_per_step(tied_tiny, monkeypatch):
    """The memory claim itself: forward + backward allocate one (V, H) tensor (the head's gradient,
    which becomes ``.grad``), where autograd's plain path allocates a second (the embedding's dense
    gradient) and, summing them out of place, a third."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_tiny, dtype=torch.float32)
    w = model.lm_head.weight
    (ids, mask, labels), = _batches(model.config.vocab_size, n=1)
    crit = CausalLMLoss(model)

    def count():
        model.zero_grad(set_to_none=True)
        with _CountVH(w.shape) as c:
            ls, _ = crit(ids, mask, labels)
            (ls / 7.0).backward()
        return c.fresh

    with _plain_path(monkeypatch):
        plain = count()
    assert plain >= 2
    assert count() == 1


def test_fallbacks_warn_once_and_stay_exact(tied_tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_tiny, dtype=torch.float32)
    batches = _batches(model.config.vocab_size, n=1)
    ref_loss, ref_g = _loss_and_grads(model, batches)
    monkeypatch.setattr(loss_mod, "_WARNED", set())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="torch.distributed is initialised"):
        loss, g = _loss_and_grads(model, batches)
    assert torch.equal(loss, ref_loss) and all(torch.equal(g[k], ref_g[k]) for k in g)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        _loss_and_grads(model, batches)
    monkeypatch.undo()

    class Scaled(nn.Embedding):  # e.g. Gemma's scaled embedding: not F.embedding
        def forward(self, ids):
            return super().forward(ids) * 2.0

    emb = model.model.embed_tokens
    scaled = Scaled(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
    scaled.weight = emb.weight
    model.model.embed_tokens = scaled
    monkeypatch.setattr(loss_mod, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="not a plain nn.Embedding"):
        loss, g = _loss_and_grads(model, batches)
    with _plain_path(monkeypatch):
        ref_loss, ref_g = _loss_and_grads(model, batches)
    assert torch.equal(loss, ref_loss) and all(torch.equal(g[k], ref_g[k]) for k in g)


def test_trainer_full_mode_tied_step_with_accumulation_and_clipping(tied_tiny, tmp_path, monkeypatch):
    """One full fine-tuning step through the Trainer (grad_accum 2, clipping, FusedAdamW): the same
    gradients, loss and updated weights as the plain path."""
    from fastft.config import load_config
    from fastft.train.cli import build
    from fastft.train.trainer import Trainer

    def step(name):
        run_dir = tmp_path / name
        cfg = load_config(None, ["--model.path", str(tied_tiny), "--output.dir", str(run_dir),
                                 "--train.progress", "false", "--finetune.mode", "full", "--model.dtype", "fp32",
                                 "--train.batch_size", "2", "--train.grad_accum", "2", "--train.max_steps", "2",
                                 "--train.max_grad_norm", "0.5", "--train.lr", "1e-3", "--model.dropout", "0"])
        torch.manual_seed(0)
        model, tok, bundle, device = build(cfg)
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert lm.lm_head.weight is lm.model.embed_tokens.weight
        tr = Trainer(cfg, run_dir, model, tok, bundle, device)
        grads, orig = [], tr.optimizer.step

        def capture(*a, **k):
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            return orig(*a, **k)

        tr.optimizer.step = capture
        run_dir.mkdir()
        losses = [tr.train_step()["loss"] for _ in range(2)]
        return grads, {n: p.detach().clone() for n, p in model.named_parameters()}, losses

    with _plain_path(monkeypatch):
        ref = step("plain")
    out = step("tied")
    for ga, gb in zip(out[0], ref[0]):
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=0)
    for n in out[1]:
        torch.testing.assert_close(out[1][n], ref[1][n], rtol=0, atol=0)
    assert repr(out[2]) == repr(ref[2])
