"""The causal-LM training/eval loss, decided by the model's adapter (``fastft.models``).

``CausalLMLoss(model)(input_ids, attention_mask, labels)`` returns (sum of target-token losses,
target count); the caller divides by the target count of the whole optimizer step. Label t is
predicted at position t-1 (HF's shift), ``-100`` is ignored: exactly HF's
``model(input_ids, labels=labels).loss`` times the count, for every adapter:

* family adapters (``adapter.fused_ce``): the decoder (``model.base_model``) runs alone, only the
  positions that have a target go through the head, and :func:`fastft.ops.fused_linear_cross_entropy`
  applies the adapter's logit transform (soft-cap, scale) without building the (N, V) logits;
* the generic adapter: HF's own forward builds the logits (with whatever the model does to them)
  and fastft sums their cross-entropy; a router auxiliary loss HF would add is added too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastft.models import Adapter, HeadTransform, adapter_for, unwrap
from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from fastft.recompute import recompute_cheap

__all__ = ["CausalLMLoss", "causal_suffices", "ce_sum"]


def ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           label_smoothing: float, fused: bool, transform: HeadTransform = HeadTransform()) -> torch.Tensor:
    """Sum of token cross-entropies of ``transform(hidden @ weight.T + bias)``, fp32 scalar.

    Args:
        hidden: (N, H) final hidden states of the target positions only.
        weight: (V, H) output head weight; bias: (V,) or None.
        targets: (N,) int64 token ids.
        fused: use fastft.ops.fused_linear_cross_entropy (no (N, V) logits); False builds them.
        transform: the model's logit transform (scale, then soft-cap).
    """
    if fused:
        return fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="sum",
                                          label_smoothing=label_smoothing, softcap=transform.softcap,
                                          logit_scale=transform.scale)
    w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)  # fp32 tied head: as autocast
    logits = F.linear(hidden, w, None if bias is None else bias.to(hidden.dtype)).float()  # (N, V)
    return F.cross_entropy(transform.apply(logits), targets, reduction="sum", label_smoothing=label_smoothing)


def causal_suffices(attention_mask: torch.Tensor, labels: torch.Tensor, position_ids=None) -> bool:
    """True when plain causal attention gives every position the loss reads the same output as
    the mask: a (B, T) 0/1 mask whose rows are right-padded (ones, then zeros) and whose pad
    positions carry no target. A real token never attends to a later key, so it never sees a pad
    key; pad positions see other pads, but only their own targets could read them, and those are
    -100. Then SDPA takes its causal fast path and fastft's causal kernels run (a mask sends
    them to HF's SDPA), instead of a materialised (B, 1, T, T) mask. Exact, not approximate."""
    if attention_mask.dim() != 2 or position_ids is not None:
        return False
    if bool(attention_mask.all()):
        return True
    m = attention_mask
    right_padded = bool(((m == 0) | (m == 1)).all()) and bool((m[:, 1:] <= m[:, :-1]).all())
    return right_padded and bool((labels[m == 0] == -100).all())


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so ``forward`` returns (sum of target-token losses, target count).

    Args:
        model: a HF ``*ForCausalLM`` (LoRA injected or PEFT-wrapped is fine).
        label_smoothing: eps of the cross-entropy in training (``smoothing=False`` turns it off).
        fused_ce: family adapters use the fused cross-entropy (False: the same maths with the
            (N, V) logits built; the generic adapter always builds them).
        recompute_cheap: rebuild saved RMSNorm/SwiGLU outputs in backward (fastft/recompute.py).
        adapter: the adapter to use; default ``fastft.models.adapter_for(model)`` (asked once,
            here, after LoRA/int8 surgery, since an adapted head changes the answer).
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, fused_ce: bool = True,
                 recompute_cheap: bool = True, adapter: Adapter | None = None):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.fused_ce = fused_ce
        self.recompute_cheap = recompute_cheap
        self.adapter = adapter if adapter is not None else adapter_for(model)
        self.transform = (self.adapter.head_transform(unwrap(model).config) if self.adapter.fused_ce
                          else HeadTransform())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, smoothing: bool = True):
        """input_ids/labels: (B, T) int64; attention_mask (B, T) 0/1 or a (B, 1, T, T) additive
        mask (packing). Returns (fp32 loss sum, int64 target count)."""
        lm = unwrap(self.model)
        ls = self.label_smoothing if smoothing else 0.0
        targets = labels[:, 1:]
        keep = targets != -100
        if not self.adapter.fused_ce:
            return self._generic(lm, input_ids, attention_mask, position_ids, targets, keep, ls)
        drop = self.adapter.drop_causal_mask and causal_suffices(attention_mask, labels, position_ids)
        kw = {} if position_ids is None else {"position_ids": position_ids}
        # saved RMSNorm/SwiGLU outputs are rebuilt in backward (fastft/recompute.py; a no-op
        # without grad, and inside checkpointed layers, whose own hooks take over)
        with recompute_cheap(self.recompute_cheap):
            out = lm.base_model(input_ids=input_ids, attention_mask=None if drop else attention_mask,
                                use_cache=False, **kw)
        h = out.last_hidden_state  # (B, T, H)
        hs = h[:, :-1][keep]  # (N, H)
        head = lm.get_output_embeddings()
        loss = ce_sum(hs, head.weight, head.bias, targets[keep], ls, self.fused_ce, self.transform)
        return loss, keep.sum()

    def _generic(self, lm, input_ids, attention_mask, position_ids, targets, keep, ls):
        kw = {} if position_ids is None else {"position_ids": position_ids}
        # no cache: a loss never reuses it (and RWKV's stateful eval path breaks at odd sizes)
        out = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        logits = out.logits[:, :-1][keep].float()  # (N, V): HF's logits, every transform applied
        loss = F.cross_entropy(logits, targets[keep], reduction="sum", label_smoothing=ls)
        count = keep.sum()
        aux = getattr(out, "aux_loss", None)
        if aux is not None:  # HF: mean CE + coef * aux, so the sum carries count * coef * aux
            loss = loss + count * getattr(lm.config, "router_aux_loss_coef", 0.0) * aux.float()
        return loss, count
