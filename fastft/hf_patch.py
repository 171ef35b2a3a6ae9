"""Make a Hugging Face causal LM compute its training loss with the fused linear cross-entropy.

``patch_model(model)`` replaces the instance's ``forward``: when the model is in training mode
and gets ``labels`` (or ``shift_labels``), it runs the decoder only, then
:func:`fastft.ops.fused_linear_cross_entropy` on the last hidden states and the output head's
weight (the tied embedding when tied), so the (B, T, V) logits never exist; the returned
``CausalLMOutputWithPast`` has ``loss`` and ``logits=None``. Otherwise (eval mode, no labels,
``generate``) the original forward runs and returns normal logits. ``unpatch_model`` restores it.

Semantics follow transformers' ``ForCausalLMLoss``: labels are shifted left by one (position t
predicts token t+1, the last position gets ``-100``), ``ignore_index=-100``, maths in fp32, Gemma 2's
``config.final_logit_softcapping`` applied as a soft cap.

Gradient accumulation: the HF Trainer passes ``num_items_in_batch``, the number of target tokens
of the whole optimizer step (all micro-batches, all ranks' share). With it the loss is the
*sum* of this micro-batch's token losses divided by that count, exactly as HF does, so summing
the micro-batch gradients gives the token-level mean over the step (not the mean of per-batch
means). Without it the loss is the mean over this batch's non-ignored tokens.

Supported ``config.model_type``: llama, qwen2, mistral, gemma, gemma2, gpt2 (each tested against
the unpatched model: same loss and gradients). Other families may transform the logits
differently (e.g. logit scales) and are refused with a clear error.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from fastft.errors import UserError

__all__ = ["patch_model", "unpatch_model", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2")
_ORIG = "_fastft_orig_forward"


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch_model(model, *, chunk_size: int | None = None):
    """Patch ``model`` (a ``*ForCausalLM``, or a PEFT model wrapping one) in place; returns it.

    Raises:
        UserError: the model type is not supported or it has no linear output head.
    """
    lm = _causal_lm(model)
    mtype = getattr(getattr(lm, "config", None), "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"patch_model: model_type={mtype!r} is not supported; expected one of "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"patch_model: output head of {type(lm).__name__} is "
                        f"{type(head).__name__}, expected torch.nn.Linear")
    if getattr(lm, _ORIG, None) is None:
        setattr(lm, _ORIG, lm.forward)
        lm._fastft_chunk_size = chunk_size
        lm.forward = types.MethodType(_fused_forward, lm)
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`; returns the model."""
    lm = _causal_lm(model)
    orig = getattr(lm, _ORIG, None)
    if orig is not None:
        del lm.forward  # the instance attribute; the class forward is visible again
        delattr(lm, _ORIG)
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

    from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

    kwargs.pop("return_dict", None)
    out = getattr(self, self.base_model_prefix)(input_ids=input_ids, **kwargs)
    hidden = out.last_hidden_state  # (B, T, H)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]  # (B, T): t predicts t+1
    head = self.get_output_embeddings()
    softcap = getattr(self.config, "final_logit_softcapping", None)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), head.bias,
                                      ignore_index=-100, softcap=softcap, reduction=reduction,
                                      chunk_size=self._fastft_chunk_size)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                  hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))
