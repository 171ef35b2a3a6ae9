"""The architecture matrix: for every causal LM in the installed transformers that builds from a
tiny config offline, fastft's training loss (``CausalLMLoss``, through the model's adapter: fused
cross-entropy with the family's logit transform and fused blocks where it has them, or the generic
adapter) and every trainable gradient equal HF's ``model(input_ids, labels=...).loss`` backward,
in fp32, full and LoRA, with and without padding; the eval loss equals HF's.

Before the adapters the trainer fed ``lm_head.weight`` straight into the fused CE, so gemma2,
gemma3_text (soft-cap), cohere (logit_scale) and granite (logits_scaling) failed here.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from _tiny_models import REQUIRED, V, build
from fastft.models import FAMILIES, HeadTransform, adapter_for
from fastft.models.lora import LoRALinear, inject_lora
from fastft.models.loss import CausalLMLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(pad: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # prompt masking
    mask = torch.ones_like(ids)
    if pad:  # right padding, as fastft's collator pads; pad positions carry no target
        ids[1, -4:] = 0
        mask[1, -4:] = 0
        labels[1, -4:] = -100
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _hf(model, ids, mask, labels):
    """HF's own training loss and gradients (the reference)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # models with random routing noise draw the same noise on both sides
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    if loss is None:
        raise ValueError("the model returned no loss")
    loss.backward()
    return loss.detach(), _grads(model)


def _fastft(model, ids, mask, labels, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    ls, n = CausalLMLoss(model, **kw)(ids, mask, labels)
    loss = ls / n
    loss.backward()
    return loss.detach(), _grads(model)


def _lora(model) -> bool:
    """fastft LoRA on every linear layer but the head, B nonzero so A gets a gradient too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            inject_lora(model, "all-linear", r=4, alpha=8, verbose=False)
        except Exception:  # noqa: BLE001
            return False
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return any(p.requires_grad for p in model.parameters())


def _check(model_type: str, mode: str, pad: bool):
    model, why = build(model_type)
    if model is None:
        pytest.skip(why)
    if mode == "lora" and not _lora(model):
        pytest.skip("no nn.Linear layer to adapt (e.g. GPT-2's Conv1D): fastft.models.lora adapts nn.Linear only")
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic adapter's notice
        adapter = adapter_for(model)
    adapter.patch_blocks(model)
    batch = _batch(pad)
    if "loss_function" not in inspect.getsource(type(ref).forward):
        pytest.skip(f"{type(ref).__name__}'s own loss is not HF's causal-LM loss (shifted labels); "
                    "fastft trains the shifted objective")
    try:
        want, want_g = _hf(ref, *batch)
    except Exception as e:  # noqa: BLE001  (HF's own model does not run at this tiny config)
        pytest.skip(f"HF's forward fails at the tiny config: {type(e).__name__}: {str(e)[:100]}")
    got, got_g = _fastft(model, *batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(got_g) == set(want_g) and want_g
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    model.eval()
    ref.eval()
    with torch.no_grad():
        try:
            ev_want = ref(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
        except Exception as e:  # noqa: BLE001  (training matched; HF's own eval path cannot run here)
            pytest.skip(f"training matched; HF's eval forward fails at the tiny config: {type(e).__name__}")
        for fused in (True, False):  # the trainer's eval (its loss module) and `fastft eval`'s
            ls, cnt = CausalLMLoss(model, fused_ce=fused)(*batch, smoothing=False)
            torch.testing.assert_close(ls / cnt, ev_want, rtol=1e-5, atol=1e-6)
    return adapter


@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("model_type", REQUIRED)
def test_required_architectures(model_type, mode, pad):
    adapter = _check(model_type, mode, pad)
    # the required families all have a fused-CE adapter (LoRA on the head would refuse it)
    assert adapter.fused_ce, adapter.reason


_OTHERS = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - set(REQUIRED))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", _OTHERS)
def test_every_other_causal_lm(model_type):
    """Every other causal LM of the installed transformers: full mode with padding."""
    _check(model_type, "full", True)


def test_registry_covers_required_and_families_are_disjoint():
    seen = [mt for a in FAMILIES for mt in a.model_types]
    assert len(seen) == len(set(seen))
    for mt in REQUIRED:
        assert mt in seen, mt


def test_softcap_is_really_applied():
    """Gemma 2's soft-cap through the fused path: the loss differs from the uncapped one (so the cap
    is applied) and equals HF's."""
    model, _ = build("gemma2")
    batch = _batch(False)
    capped, _ = _fastft(model, *batch)
    loss_mod = CausalLMLoss(model)
    assert loss_mod.transform == HeadTransform(softcap=0.3)
    loss_mod.transform = HeadTransform()
    ls, n = loss_mod(*batch)
    uncapped = (ls / n).detach()
    hf, _ = _hf(model, *batch)
    torch.testing.assert_close(capped, hf, rtol=1e-5, atol=1e-6)
    assert abs(capped.item() - uncapped.item()) > 1e-2, (capped, uncapped)


@pytest.mark.parametrize("model_type,key,value", [("llama", "logit_scale", 0.5),
                                                   ("gemma", "final_logit_softcapping", 5.0),
                                                   ("qwen2", "logits_scaling", 2.0)])
def test_unknown_head_transform_falls_back(model_type, key, value):
    """A config carrying a known logit-transform key its adapter does not apply is not guessed at:
    the generic adapter (HF's forward) trains it, with one notice naming the key."""
    model, _ = build(model_type)
    setattr(model.config, key, value)
    with pytest.warns(RuntimeWarning, match=f"{key}={value}"):
        a = adapter_for(model)
    assert a.generic and not a.fused_ce
    batch = _batch(True)
    want, want_g = _hf(copy.deepcopy(model), *batch)
    got, got_g = _fastft(model, *batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6)


def test_lora_on_the_head_falls_back():
    """An adapted output head is not a plain nn.Linear: the fused CE would read the frozen weight
    only, so the generic adapter takes over."""
    model, _ = build("llama")
    model.lm_head = LoRALinear(model.lm_head, 2, 4.0, 0.0, False)
    with pytest.warns(RuntimeWarning, match="output head is LoRALinear"):
        assert adapter_for(model).generic


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "cohere", "granite"])
def test_skipping_the_transform_would_fail(model_type):
    """The matrix can fail: the old trainer's loss (lm_head.weight straight into the fused CE, no
    transform) is far from HF's for these architectures."""
    model, _ = build(model_type)
    batch = _batch(True)
    hf, _ = _hf(model, *batch)
    old = CausalLMLoss(model)
    assert old.transform != HeadTransform()
    old.transform = HeadTransform()
    ls, n = old(*batch)
    assert abs((ls / n).item() - hf.item()) > 1e-3  # the matrix checks to 1e-5


def test_classifier_keeps_the_family_blocks():
    """A llama-backbone classifier has no causal-LM head (its loss is the classifier's), but its
    decoder blocks are the family's: the recipe still fuses them (as before the adapters)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastft.models import blocks_adapter_for

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg)
    fam = blocks_adapter_for(model)
    assert fam is not None and fam.name == "llama" and fam.fused_blocks
    counts = fam.patch_blocks(model)
    assert counts["rms_norm"] == 2 * 2 + 1 and counts["mlp"] == 2
    assert blocks_adapter_for(torch.nn.Linear(2, 2)) is None
