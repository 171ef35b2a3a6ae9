"""Make a Hugging Face causal LM compute its training loss with the fused linear cross-entropy.

``patch_model(model)`` replaces the instance's ``forward``: when the model is in training mode
and gets ``labels`` (or ``shift_labels``), it runs the decoder only, then
:func:`fastft.ops.fused_linear_cross_entropy` on the last hidden states and the output head's
weight (the tied embedding when tied), so the (B, T, V) logits never exist; the returned
``CausalLMOutputWithPast`` has ``loss`` and ``logits=None``. Otherwise (eval mode, no labels,
``generate``) the original forward runs and returns normal logits. ``unpatch_model`` restores it.

Semantics follow transformers' ``ForCausalLMLoss``: labels are shifted left by one (position t
predicts token t+1, the last position gets ``-100``), ``ignore_index=-100``, maths in fp32, and the
model's logit transform (Gemma 2/3's soft-cap, Cohere's ``logit_scale``, Granite's
``logits_scaling``) applied as its adapter (``fastft.models``) says.

Gradient accumulation: the HF Trainer passes ``num_items_in_batch``, the number of target tokens
of the whole optimizer step (all micro-batches, all ranks' share). With it the loss is the
*sum* of this micro-batch's token losses divided by that count, exactly as HF does, so summing
the micro-batch gradients gives the token-level mean over the step (not the mean of per-batch
means). Without it the loss is the mean over this batch's non-ignored tokens.

Which models: those whose adapter (``fastft.models.adapter_for``) has the fused cross-entropy
(tests/test_model_adapters.py checks each against the unpatched model: same loss and gradients).
Any other causal LM is left on HF's forward (already correct), with one notice saying why; a
model that is not a causal LM is refused with a clear error.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from fastft.errors import UserError
from fastft.models import FAMILIES, adapter_for, unwrap
from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

__all__ = ["patch_model", "unpatch_model", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = tuple(mt for a in FAMILIES if a.fused_ce for mt in a.model_types)
_ORIG = "_fastft_orig_forward"


def _is_causal_lm(lm) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(lm).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def patch_model(model, *, chunk_size: int | None = None):
    """Patch ``model`` (a ``*ForCausalLM``, or a PEFT model wrapping one) in place; returns it.

    A causal LM without a fused-CE adapter (``fastft.models.adapter_for``) is returned unpatched
    (HF's forward is correct, only unfused) after one ``RuntimeWarning`` saying why.

    Raises:
        UserError: the model is not a causal LM.
    """
    lm = unwrap(model)
    mtype = getattr(getattr(lm, "config", None), "model_type", None)
    if not _is_causal_lm(lm):
        raise UserError(f"patch_model: model_type={mtype!r} is not supported: {type(lm).__name__} is not "
                        f"a causal LM (AutoModelForCausalLM)")
    adapter = adapter_for(lm)
    if not adapter.fused_ce:
        return model
    if getattr(lm, _ORIG, None) is None:
        setattr(lm, _ORIG, lm.forward)
        lm._fastft_chunk_size = chunk_size
        lm._fastft_head = adapter.head_transform(lm.config)
        lm.forward = types.MethodType(_fused_forward, lm)
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`; returns the model."""
    lm = unwrap(model)
    orig = getattr(lm, _ORIG, None)
    if orig is not None:
        del lm.forward  # the instance attribute; the class forward is visible again
        delattr(lm, _ORIG)
        del lm._fastft_head
    return model


def _fused_forward(self, input_ids=None, *args, labels=None, shift_labels=None,
                   num_items_in_batch=None, logits_to_keep=0, **kwargs):
    orig = getattr(self, _ORIG)
    if not self.training or (labels is None and shift_labels is None) or args:
        return orig(input_ids, *args, labels=labels, logits_to_keep=logits_to_keep,
                    **({} if shift_labels is None else {"shift_labels": shift_labels}),
                    **({} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}),
                    **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("return_dict", None)
    out = getattr(self, self.base_model_prefix)(input_ids=input_ids, **kwargs)
    hidden = out.last_hidden_state  # (B, T, H)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]  # (B, T): t predicts t+1
    head = self.get_output_embeddings()
    tf = self._fastft_head
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), head.bias,
                                      ignore_index=-100, softcap=tf.softcap, logit_scale=tf.scale,
                                      reduction=reduction,
                                      chunk_size=self._fastft_chunk_size)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                  hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))
