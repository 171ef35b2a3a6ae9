"""fastft.models.recompute: saved RMSNorm/SwiGLU outputs are rebuilt in backward instead of kept.

Op level: a registered tensor saved by a matmul is packed as a recipe handle and unpacked to the
bitwise-identical view, and its storage is really freed. Model level: a tiny patched Llama gives
bitwise-equal loss and gradients with and without the mechanism (full, LoRA on q/v, LoRA on
down_proj; bf16 and fp32), with the number of recomputations the saved-tensor analysis predicts;
the same under torch.utils.checkpoint (mechanism outside or inside the checkpointed function).
Memory: the bytes the graph saves drop by exactly the registered outputs' size (from shapes), and
the handles hold only tensors the graph saves anyway. Safety: in-place writes, no-grad, double
backward. End to end: `fastft train` losses and weights are identical with the switch on and off.
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from fastft.models import hf_fast, recompute
from fastft.models.lora import inject_lora
from fastft.models.recompute import recompute_cheap, register
from fastft.train.utils import CausalLMLoss

VOCAB = 101


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # tests/conftest.py
    yield


@pytest.fixture
def runs(monkeypatch):
    """Counts recomputations (calls of a recipe)."""
    n = collections.Counter()
    orig = recompute._Recipe._run

    def counted(self):
        n["runs"] += 1
        return orig(self)
    monkeypatch.setattr(recompute._Recipe, "_run", counted)
    return n


# ---------------------------------------------------------------------------------------- op level
def test_pack_gives_a_handle_and_unpack_the_bitwise_view():
    x = torch.randn(9, 37, requires_grad=True) * 1.5
    w = torch.randn(37, 11, requires_grad=True)
    with recompute_cheap() as rc:
        y = torch.sin(x)                     # (9, 37) fp32, exactly its own storage
        assert register(y, torch.sin, x)
        v = y[2:, 3:]                        # a strided view, storage offset 77
        h = rc._pack(v)
        assert isinstance(h, recompute._Handle)
        assert rc._pack(x) is x              # not registered: passed through
        assert rc._pack(w) is w              # a parameter: passed through
        h1, h2 = rc._pack(v), rc._pack(y)    # two more consumers of the same output
        # backward without create_graph unpacks with grad disabled: one recomputation is shared
        # by the three handles and released after the last has unpacked it
        with torch.no_grad():
            u = rc._unpack(h)
            assert h.recipe.cached is not None
            u1 = rc._unpack(h1)
            assert h.recipe.cached is not None
            u2 = rc._unpack(h2)
            assert h.recipe.cached is None
    assert torch.equal(u, v) and u.stride() == v.stride() and u.storage_offset() == v.storage_offset()
    assert u.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()  # rebuilt, not kept
    assert u1.untyped_storage().data_ptr() == u.untyped_storage().data_ptr() == u2.untyped_storage().data_ptr()
    assert torch.equal(u1, v) and torch.equal(u2, y)


def test_registered_tensor_saved_by_matmul_is_recomputed(runs):
    torch.manual_seed(0)
    a = torch.randn(9, 37, requires_grad=True)
    w = torch.randn(37, 11, requires_grad=True)
    with recompute_cheap():
        x = a * 1.5                          # non-leaf: sin saves x for its own backward
        y = torch.sin(x)
        assert register(y, torch.sin, x)
        z = (y[2:, 3:] @ w[3:]).square().sum()  # mm saves the view (for dw) and w (for dx)
    gone = StorageWeakRef(y.untyped_storage())
    del y
    assert gone.expired()                    # the graph does not hold y
    gw, ga = torch.autograd.grad(z, (w, a))
    assert runs["runs"] == 1
    a2 = a.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    z2 = (torch.sin(a2 * 1.5)[2:, 3:] @ w2[3:]).square().sum()
    rw, ra = torch.autograd.grad(z2, (w2, a2))
    assert torch.equal(z, z2) and torch.equal(gw, rw) and torch.equal(ga, ra)


def test_without_context_nothing_is_registered_and_storage_is_kept():
    x = torch.randn(5, 7, requires_grad=True) * 1
    y = torch.sin(x)
    assert not register(y, torch.sin, x) and not recompute.active()
    with recompute_cheap(False):
        assert not register(y, torch.sin, x) and not recompute.active()
    w = torch.randn(7, 3, requires_grad=True)
    z = (y @ w).sum()
    keep = StorageWeakRef(y.untyped_storage())
    del y
    assert not keep.expired()
    z.backward()


def test_no_grad_is_a_no_op():
    x = torch.randn(5, 7)
    with recompute_cheap():
        assert recompute.active()
        with torch.no_grad():
            assert not recompute.active()
            assert not register(torch.sin(x), torch.sin, x)


def test_in_place_write_after_registration_passes_through(runs):
    w = torch.randn(7, 3, requires_grad=True)
    x = torch.randn(5, 7, requires_grad=True) * 1
    with recompute_cheap() as rc:
        y = torch.sin(x)
        assert register(y, torch.sin, x)
        y.mul_(2)                             # sin(x) is no longer what y holds
        assert rc._pack(y) is y
        z = (y @ w).sum()
    z.backward()
    assert runs["runs"] == 0
    w2 = w.detach().clone().requires_grad_()
    (2 * torch.sin(x.detach()) @ w2).sum().backward()
    assert torch.equal(w.grad, w2.grad)


def test_recipe_input_written_in_place_after_save_raises():
    w = torch.randn(7, 3, requires_grad=True)
    x = torch.randn(5, 7, requires_grad=True) * 1
    with recompute_cheap():
        y = torch.sin(x)
        register(y, torch.sin, x)
        z = (y @ w).sum()
    with torch.no_grad():
        x.add_(1)                             # the recipe would now compute a different y
    with pytest.raises(RuntimeError, match="modified in place"):
        z.backward()


def test_nested_context_and_double_backward():
    torch.manual_seed(1)
    x0 = torch.randn(6, 5)
    w0 = torch.randn(5, 4)

    def second_order(use):
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        with recompute_cheap(use):
            with recompute_cheap() as inner:   # inside our active hooks: does nothing
                assert (inner._hooks is None) is use
            xm = x * 1
            y = torch.sin(xm)
            assert register(y, torch.sin, xm) is use
            z = (y @ w).square().sum()
        gw, = torch.autograd.grad(z, w, create_graph=True)
        return torch.autograd.grad(gw.square().sum(), x)[0]
    assert torch.equal(second_order(True), second_order(False))


# ------------------------------------------------------------------------------------- model level
def _tiny_llama(dtype, layers=3, seed=0, h=64, inter=150):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    m = m.to(dtype)
    hf_fast.patch_blocks(m, layers=False)  # the per-op path is what registers recomputes
    return m


def _lora(m, targets):
    inject_lora(m, target_modules=targets, r=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():  # B starts at zero, which would make dA zero whatever A's input is
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    return m


def _ids(b=3, t=11, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(m, ids, use):
    m.zero_grad(set_to_none=True)
    loss, _ = CausalLMLoss(m, fused_ce=True, recompute_cheap=use)(ids, torch.ones_like(ids), ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


# per layer: full mode rebuilds both norm outputs and the SwiGLU output; LoRA on q/v only the input
# norm's (the frozen gate/up/down save no activation), LoRA on down_proj only the SwiGLU output.
# Layer 0 under LoRA gets no gradient from below (frozen embeddings): its norm/SwiGLU make no graph
# node, so nothing is registered there and down/q/v save the real tensor.
CASES = {"full": (None, lambda L: 3 * L), "lora_qv": (["q_proj", "v_proj"], lambda L: L - 1),
         "lora_down": (["down_proj"], lambda L: L - 1)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_llama_gradients_bitwise_equal(case, dtype, runs):
    targets, expect = CASES[case]
    m = _tiny_llama(dtype)
    if targets:
        _lora(m, targets)
    ids = _ids()
    off = _loss_and_grads(m, ids, False)
    assert runs["runs"] == 0
    on = _loss_and_grads(m, ids, True)
    assert runs["runs"] == expect(3)
    assert torch.equal(on[0], off[0])
    assert on[1].keys() == off[1].keys() and len(on[1]) > 0
    for n in off[1]:
        assert torch.equal(on[1][n], off[1][n]), n


@pytest.mark.parametrize("reentrant", [False, True])
def test_under_hf_gradient_checkpointing(reentrant, runs):
    """Our hooks outside checkpointed layers: checkpoint's hooks are innermost there and take
    over; nothing inside a layer is registered; gradients equal the plain run bitwise."""
    m = _tiny_llama(torch.bfloat16)
    ids = _ids()
    m.train()
    plain = _loss_and_grads(m, ids, False)
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ck = _loss_and_grads(m, ids, True)
    # non-reentrant: the layers run under checkpoint's hooks, nothing registered; reentrant: the
    # layers run without grad in forward (nothing saved) and are recomputed outside our context
    assert runs["runs"] == 0
    assert torch.equal(ck[0], plain[0])
    for n in plain[1]:
        assert torch.equal(ck[1][n], plain[1][n]), n


@pytest.mark.parametrize("reentrant", [False, True])
def test_inside_a_checkpointed_function(reentrant, runs):
    """Our context entered inside torch.utils.checkpoint: a no-op under the non-reentrant
    checkpoint's hooks; with the reentrant one its recompute runs without hooks, so ours act there."""
    m = _tiny_llama(torch.bfloat16)
    ids = _ids()

    def body(emb, use=True):
        with recompute_cheap(use):
            return m.model(inputs_embeds=emb).last_hidden_state.float().square().mean()

    def grads(use_ckpt, use=True):
        m.zero_grad(set_to_none=True)
        emb = m.model.embed_tokens(ids).detach().requires_grad_()
        out = checkpoint(body, emb, use_reentrant=reentrant) if use_ckpt else body(emb, use)
        out.backward()
        return out.detach(), emb.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(False, use=False)  # neither checkpoint nor recompute
    assert runs["runs"] == 0
    grads(False)
    assert runs["runs"] == 9       # recompute alone: 3 layers x 3 outputs
    runs.clear()
    got = grads(True)
    assert runs["runs"] == (9 if reentrant else 0)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    for n in ref[2]:
        assert torch.equal(got[2][n], ref[2][n]), n


# ------------------------------------------------------------------------------------------- memory
def _saved(m, ids, use):
    """Run one forward with saved-tensor bookkeeping: storages of the tensors the graph keeps
    (parameters excluded), and the recipe handles (with the tensors they hold)."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    kept, handles = {}, []
    rc = recompute_cheap(use)
    inner = rc._pack

    def pack(t):  # ours, observed: what it returns is what the graph stores
        r = inner(t)
        if isinstance(r, torch.Tensor):
            if r.untyped_storage().data_ptr() not in params:
                kept[r.untyped_storage().data_ptr()] = r.untyped_storage().nbytes()
        else:
            handles.append(r)
        return r
    registered = []
    orig_register = rc._register

    def reg(out, fn, args):
        ok = orig_register(out, fn, args)
        if ok:
            registered.append(StorageWeakRef(out.untyped_storage()))
        return ok
    rc._register = reg
    if use:
        rc._pack_fn = pack
        with rc:
            out = m.model(input_ids=ids).last_hidden_state
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m.model(input_ids=ids).last_hidden_state
    return out, kept, handles, registered, params


@pytest.mark.parametrize("case", ["full", "lora_qv"])
def test_saved_bytes_drop_by_the_registered_outputs(case):
    B, T, H, INTER, L = 4, 32, 64, 160, 3
    m = _tiny_llama(torch.bfloat16, layers=L, h=H, inter=INTER)
    if case == "lora_qv":
        _lora(m, ["q_proj", "v_proj"])
    ids = _ids(B, T)
    _, kept_off, _, _, _ = _saved(m, ids, False)
    out, kept_on, handles, registered, params = _saved(m, ids, True)
    el = 2  # bf16
    expect = L * B * T * (2 * H + INTER) * el if case == "full" else (L - 1) * B * T * H * el
    assert sum(kept_off.values()) - sum(kept_on.values()) == expect
    # the handles hold only tensors the graph keeps anyway (or parameters): no added memory
    for h in handles:
        for a in h.recipe.args:
            if isinstance(a, torch.Tensor):
                ptr = a.untyped_storage().data_ptr()
                assert ptr in kept_on or ptr in params
    # and the registered outputs' storages are really freed (the final norm's output is `out`)
    del out
    alive = [r for r in registered if not r.expired()]
    assert alive == []


# --------------------------------------------------------------------------------------- end to end
def test_fastft_train_identical_with_switch_on_and_off(tmp_path, runs):
    from trainer_helpers import make_tiny_model

    from fastft.train.cli import run

    tiny = make_tiny_model(tmp_path / "model")
    res = {}
    for flag in ("true", "false"):
        d = tmp_path / f"run-{flag}"
        run(None, ["--model.path", str(tiny), "--output.dir", str(d), "--train.progress", "false",
                   "--output.tensorboard", "false", "--train.batch_size", "4", "--train.max_steps", "3",
                   "--finetune.mode", "full", "--model.dtype", "bf16", "--train.lr", "3e-3",
                   "--model.recompute_cheap", flag])
        import json
        res[flag] = [r["loss"] for r in map(json.loads, open(d / "metrics.jsonl")) if r["event"] == "train"]
        # 3 steps x 2 layers x 3 rebuilt outputs when on (the training steps only; eval has no grad)
        assert runs.pop("runs", 0) == (18 if flag == "true" else 0)
    assert len(res["true"]) == 3 and res["true"] == res["false"]
