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

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fastft import _backend
from fastft.models import Adapter, HeadTransform, adapter_for, hf_fast, unwrap
from fastft.models.hf_fast import packed_segments
from fastft.models.recompute import recompute_cheap
from fastft.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from fastft.ops.segments import block_causal_mask, segments_from_cu_seqlens, segments_from_position_ids
from fastft.ops.tied_embedding import TiedGrad, tied_embedding
from fastft.runtime import release_free_heap

__all__ = ["CausalLMLoss", "attention_inputs", "causal_suffices", "ce_sum", "tied_head_grad"]


def ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           label_smoothing: float, fused: bool, transform: HeadTransform = HeadTransform(),
           weight_grad_to: TiedGrad | None = None) -> torch.Tensor:
    """Sum of token cross-entropies of ``transform(hidden @ weight.T + bias)``, fp32 scalar.

    Args:
        hidden: (N, H) final hidden states of the target positions only.
        weight: (V, H) output head weight; bias: (V,) or None.
        targets: (N,) int64 token ids.
        fused: use fastft.ops.fused_linear_cross_entropy (no (N, V) logits); False builds them.
        transform: the model's logit transform (scale, then soft-cap).
        weight_grad_to: fused only: hand ``weight``'s gradient to the tied embedding's backward
            (:func:`tied_head_grad`).
    """
    if fused:
        return fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="sum",
                                          label_smoothing=label_smoothing, softcap=transform.softcap,
                                          logit_scale=transform.scale, weight_grad_to=weight_grad_to)
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
    m = attention_mask
    # one device-side expression, read once: on a GPU each bool() is a host sync (there were four)
    right_padded = ((m == 0) | (m == 1)).all() & (m[:, 1:] <= m[:, :-1]).all()
    pads_ignored = ~((m == 0) & (labels != -100)).any()
    return bool(m.all() | (right_padded & pads_ignored))


def _right_padded(m: torch.Tensor) -> bool:
    """(B, T) 0/1 rows of ones then zeros."""
    return bool(((m == 0) | (m == 1)).all()) and bool((m[:, 1:] <= m[:, :-1]).all())


def attention_inputs(lm: nn.Module, attention_mask: torch.Tensor, labels: torch.Tensor, position_ids=None,
                     cu_seqlens=None):
    """How the decoder should see a batch: (mask for HF or None, Segments or None).

    * Rows that are plain causal (no padding, no position ids): (None, None).
    * Packed rows (``position_ids`` restarting at 0 per sample) or right-padded rows whose pads
      carry no target, on a model whose attention fastft routes (``hf_fast.routes_attention``):
      (None, the rows' :class:`~fastft.ops.segments.Segments`): a pad tail is one more sample,
      nothing T x T is built and the fused layers run.
    * ``cu_seqlens`` ((N + 1,) int, FlashAttention's varlen convention over the B * T tokens,
      pad tails as samples) when given describes the samples in place of the position ids.
    * Otherwise what HF needs: a 4-D mask as given; packed rows get the (B, 1, T, T) block mask
      (said once); right-padded rows without pad targets none (:func:`causal_suffices`); else the
      2-D mask.
    """
    if attention_mask.dim() != 2:
        return attention_mask, None
    if position_ids is None and bool(attention_mask.all()):
        return None, None
    pads_untargeted = bool((labels[attention_mask == 0] == -100).all())
    if position_ids is None and cu_seqlens is None and causal_suffices(attention_mask, labels):
        # right-padded rows: plain causal is exact for every target; the segments (pad tail apart)
        # only save work in fastft's own kernels (pads stop attending the real tokens), not where
        # the device's default attention is the vendor's SDPA
        if _backend.choose_backend("attention", attention_mask.device) == "torch":
            return None, None
    if _right_padded(attention_mask) and pads_untargeted and hf_fast.routes_attention(lm):
        if cu_seqlens is not None:
            return None, segments_from_cu_seqlens(cu_seqlens, *attention_mask.shape)
        pos = position_ids if position_ids is not None else torch.arange(
            attention_mask.shape[1], device=attention_mask.device)[None]  # one sample (+ pad tail) per row
        return None, segments_from_position_ids(pos.expand(attention_mask.shape[0], -1), attention_mask)
    if position_ids is not None:
        _warn_once_packed()
        return block_causal_mask(position_ids, attention_mask, _mask_dtype(lm)), None
    return (None if causal_suffices(attention_mask, labels) else attention_mask), None


def _mask_dtype(lm: nn.Module) -> torch.dtype:
    p = next((p for p in lm.parameters() if p.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype


_WARNED: set = set()


def _warn_once_packed() -> None:
    if "packed" not in _WARNED:
        _WARNED.add("packed")
        warnings.warn("fastft: packed rows run with a (B, 1, T, T) block mask and HF's attention (the model's "
                      "attention is not routed through fastft: unsupported architecture, model.fused_attention "
                      "off, attn_implementation other than sdpa, or gradient checkpointing)", RuntimeWarning,
                      stacklevel=3)


def _tied_refusal(lm: nn.Module, emb: nn.Module) -> str | None:
    """Why a trainable tied head/embedding must keep autograd's plain two-gradient path (None: it
    need not)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # DDP's reducer and FSDP fire on the weight's AccumulateGrad and view/shard its gradient
        # (bucket views, flat parameters); the hand-off has only been checked in one process
        return "torch.distributed is initialised (DDP/FSDP keep autograd's own path)"
    if type(emb) is not nn.Embedding:  # e.g. Gemma's scaled embedding: its forward is not F.embedding
        return f"the input embedding is a {type(emb).__name__}, not a plain nn.Embedding"
    if emb.max_norm is not None or emb.sparse:
        return "the input embedding has max_norm or sparse gradients"
    if "forward" in vars(emb):
        return "the input embedding's forward is already replaced"
    return None


@contextmanager
def tied_head_grad(lm: nn.Module, fused: bool):
    """While the decoder runs, route a trainable tied embedding through
    :func:`fastft.ops.tied_embedding.tied_embedding`; yields its :class:`TiedGrad` (None when the
    head is not tied, not trained, not fused, or where the plain path must stay, said once).

    Why: the fused cross-entropy's (V, H) head gradient and the embedding's dense (V, H) gradient
    (plus their sum) are all alive at the end of plain backward; with the hand-off only one is
    (SmolLM2-135M fp32 full fine-tuning: 113 MB each, the step's peak RSS, benchmarks/README.md).
    """
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    w = getattr(emb, "weight", None)
    if not (fused and torch.is_grad_enabled() and head is not None and w is not None
            and getattr(head, "weight", None) is w and w.requires_grad):
        yield None
        return
    why = _tied_refusal(lm, emb)
    if why is not None:
        if ("tied", why) not in _WARNED:
            _WARNED.add(("tied", why))
            warnings.warn(f"fastft: the tied embedding/head weight gets two dense (V, H) gradients summed by "
                          f"autograd (one more (V, H) buffer at the end of backward): {why}", RuntimeWarning,
                          stacklevel=3)
        yield None
        return
    slot = TiedGrad()
    # an instance attribute shadows nn.Embedding.forward; __call__ (and its hooks: fastft's fp32
    # embedding cast, HF's input-requires-grad hook) stays as it is
    emb.forward = lambda input: tied_embedding(input, emb.weight, slot, emb.padding_idx, emb.scale_grad_by_freq)
    try:
        yield slot
    finally:
        del emb.forward


class CausalLMLoss(nn.Module):
    """Wraps a causal LM so ``forward`` returns (sum of target-token losses, target count).

    Args:
        model: a HF ``*ForCausalLM`` (LoRA injected or PEFT-wrapped is fine).
        label_smoothing: eps of the cross-entropy in training (``smoothing=False`` turns it off).
        fused_ce: family adapters use the fused cross-entropy (False: the same maths with the
            (N, V) logits built; the generic adapter always builds them).
        recompute_cheap: rebuild saved RMSNorm/SwiGLU outputs in backward (fastft/models/recompute.py).
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
                position_ids: torch.Tensor | None = None, smoothing: bool = True,
                cu_seqlens: torch.Tensor | None = None):
        """input_ids/labels: (B, T) int64; attention_mask (B, T) 0/1 (or a (B, 1, T, T) additive
        mask); position_ids (B, T), restarting at 0 per sample in packed rows. Returns (fp32 loss
        sum, int64 target count)."""
        lm = unwrap(self.model)
        ls = self.label_smoothing if smoothing else 0.0
        targets = labels[:, 1:]
        keep = targets != -100
        if not self.adapter.fused_ce:
            # HF's forward gets the mask as given: dropping a right-padding mask is exact only for
            # causal attention, which an unknown model need not have (BERT-as-LM is bidirectional);
            # packed rows still get their block mask
            packed = position_ids is not None or cu_seqlens is not None
            mask = attention_inputs(lm, attention_mask, labels, position_ids, cu_seqlens)[0] if packed \
                else attention_mask
            return self._generic(lm, input_ids, mask, position_ids, targets, keep, ls)
        mask, segments = attention_inputs(lm, attention_mask, labels, position_ids, cu_seqlens)
        # saved RMSNorm/SwiGLU outputs are rebuilt in backward (fastft/models/recompute.py; a no-op
        # without grad, and inside checkpointed layers, whose own hooks take over)
        with recompute_cheap(self.recompute_cheap), packed_segments(segments), \
                tied_head_grad(lm, self.fused_ce) as slot:
            out = lm.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=False)
        h = out.last_hidden_state  # (B, T, H)
        hs = h[:, :-1][keep]  # (N, H)
        head = lm.get_output_embeddings()
        if h.device.type == "cpu" and torch.is_grad_enabled() and head.weight.requires_grad:
            # the head's fresh (V, H) gradient and chunk buffer come next, on top of every
            # activation: the step's peak. Free heap pages returned first don't count in it
            # (full fine-tuning SmolLM2-135M fp32: peak RSS -160 MB, fastft/runtime.py)
            release_free_heap()
        loss = ce_sum(hs, head.weight, head.bias, targets[keep], ls, self.fused_ce, self.transform,
                      weight_grad_to=slot if slot is not None and slot.armed else None)
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
