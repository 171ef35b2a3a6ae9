"""fastft.patch_model vs the unpatched Hugging Face model: same loss and the same gradients
(every parameter, the tied embedding included), for tiny random models of each supported family
built from a config (no download). Eval mode / no labels still return logits."""
from __future__ import annotations

import pytest
import torch
import transformers

from fastft import patch_model, unpatch_model
from fastft.errors import UserError

V = 211  # odd vocabulary
COMMON = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              tie_word_embeddings=True)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=12),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=12, final_logit_softcapping=3.0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            tie_word_embeddings=True),
}


def _model(family):
    torch.manual_seed(0)
    cfg = CONFIGS[family]()
    cfg._attn_implementation = "eager"
    m = transformers.AutoModelForCausalLM.from_config(cfg).float()
    m.train()
    return m


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt masking
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels[1, -3:] = -100
    return ids, mask, labels


def _loss_and_grads(model, **extra):
    ids, mask, labels = _batch()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("num_items", [None, 17])
def test_patched_matches_unpatched(family, num_items):
    model = _model(family)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref, ref_g = _loss_and_grads(model, **extra)
    assert ref.logits is not None
    patch_model(model, chunk_size=7)
    got, got_g = _loss_and_grads(model, **extra)
    assert got.logits is None  # the fused path never builds the logits
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert set(got_g) == set(ref_g)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    # eval mode and no-label calls keep logits
    model.eval()
    ids, mask, labels = _batch()
    with torch.no_grad():
        ev = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert ev.logits is not None and ev.logits.shape == (2, 13, V)
    model.train()
    assert model(input_ids=ids, attention_mask=mask).logits is not None
    unpatch_model(model)
    again, _ = _loss_and_grads(model, **extra)
    assert again.logits is not None


def test_generate_after_patch():
    model = _model("llama")
    patch_model(model)
    model.eval()
    ids, _, _ = _batch()
    out = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_unsupported_family_is_a_clear_error():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    m = transformers.BertForMaskedLM(cfg)
    with pytest.raises(UserError, match="model_type='bert' is not supported"):
        patch_model(m)


def test_causal_lm_without_fused_adapter_stays_on_hf_forward():
    """A causal LM fastft has no adapter for (here BLOOM) is left on HF's forward, which is
    correct, and the user is told once which fused paths are off and why."""
    cfg = transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)
    m = transformers.AutoModelForCausalLM.from_config(cfg).float().train()
    with pytest.warns(RuntimeWarning, match="model_type='bloom'.*fused cross-entropy.*off"):
        patch_model(m)
    out, _ = _loss_and_grads(m)
    assert out.logits is not None  # HF's own forward ran
