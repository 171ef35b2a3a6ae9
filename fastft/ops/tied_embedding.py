"""Embedding lookup whose backward adds into the tied output head's weight gradient.

A tied ``lm_head`` / ``embed_tokens`` weight (V, H) gets two gradients in one backward: the head's
(from :func:`fastft.ops.fused_linear_cross_entropy`, computed in its forward) and the embedding's.
Plain autograd builds each as a dense (V, H) tensor and sums them in the weight's input buffer, so
at the end of backward up to three (V, H) tensors are alive at once (head grad, dense embedding
grad, their sum): SmolLM2-135M fp32, 113 MB each, measured +216 MB of RSS in that phase of a
full fine-tuning step (``benchmarks/README.md``). Here the head hands its gradient over
(:class:`TiedGrad`) instead of returning it, and the embedding's backward adds its rows into that
same tensor and returns it as the weight's only gradient: one (V, H) gradient exists, and it still
reaches the weight through autograd's ``AccumulateGrad`` (hooks, ``.grad`` accumulation across
micro-batches and the optimizer see nothing different).

Exactness: the embedding's rows are summed by ``aten.embedding_dense_backward`` on the compacted
ids (the same kernel and order of additions as the dense backward, over the U distinct ids only),
then added to the head gradient row by row, which is what the input buffer's ``head + dense`` does
for those rows; the other rows get ``+ 0`` there and are untouched here (bit-identical gradients,
up to the sign of zero).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TiedGrad", "tied_embedding"]


class TiedGrad:
    """Hand-off slot for one forward: the head's backward stores its scaled (V, H) weight gradient
    in ``grad``, the embedding's backward takes it (and clears the slot)."""

    __slots__ = ("grad", "armed")

    def __init__(self) -> None:
        self.grad: Tensor | None = None
        self.armed = False  # a tied_embedding with a backward node was recorded in this forward


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, scale_grad_by_freq, slot):
        ctx.save_for_backward(ids)
        ctx.num_weights, ctx.padding_idx, ctx.scale_by_freq, ctx.slot = (
            weight.shape[0], padding_idx, scale_grad_by_freq, slot)
        return F.embedding(ids, weight, padding_idx, None, 2.0, scale_grad_by_freq, False)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        head = ctx.slot.grad
        ctx.slot.grad = None  # the returned tensor must be autograd's only reference (AccumulateGrad steals it)
        pad = -1 if ctx.padding_idx is None else ctx.padding_idx
        if head is None:  # the head's backward did not hand a gradient over: the plain dense gradient
            return None, torch.ops.aten.embedding_dense_backward(
                g, ids, ctx.num_weights, pad, ctx.scale_by_freq), None, None, None
        uniq, inv = torch.unique(ids.reshape(-1), return_inverse=True)  # (U,), (n,) compact ids
        cpad = -1
        if pad >= 0:
            hit = (uniq == pad).nonzero()
            cpad = int(hit[0, 0]) if hit.numel() else -1
        rows = torch.ops.aten.embedding_dense_backward(
            g.reshape(-1, g.shape[-1]), inv, uniq.numel(), cpad, ctx.scale_by_freq)  # (U, H)
        head.index_add_(0, uniq, rows.to(head.dtype))
        return None, head, None, None, None


def tied_embedding(ids: Tensor, weight: Tensor, slot: TiedGrad, padding_idx: int | None = None,
                   scale_grad_by_freq: bool = False) -> Tensor:
    """``F.embedding(ids, weight, padding_idx)`` whose weight gradient is ``slot.grad`` (the tied
    head's, handed over by ``fused_linear_cross_entropy(..., weight_grad_to=slot)``, which the
    caller passes only once ``slot.armed``: this call recorded a backward node that will take it)
    plus the embedding's own rows, added in place.

    Args:
        ids: (...) int64 token ids in [0, V).
        weight: (V, H) the embedding, the same tensor the head uses.
        slot: the :class:`TiedGrad` given to the head's cross-entropy of the same forward.
        padding_idx, scale_grad_by_freq: as ``nn.Embedding``'s.
    Returns:
        (..., H) the embeddings, in ``weight``'s dtype.
    """
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    if torch.is_grad_enabled() and weight.requires_grad:
        # only a recorded node takes the head's gradient: under no_grad (e.g. a reentrant
        # checkpoint's first pass) nothing would, and the head must return it as usual
        slot.armed = True
    return _TiedEmbedding.apply(ids, weight, padding_idx, scale_grad_by_freq, slot)
