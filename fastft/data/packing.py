"""Sequence packing: several short examples in one row, without attention across samples.

A packed row concatenates examples; ``position_ids`` restart at 0 for each sample (so RoPE sees
the same positions as unpacked), and the first label of every sample is -100 (in an unpacked row
nothing predicts token 0; packed, the previous sample's last token would). Attention is kept
inside each sample from the position ids: :class:`PackedCollator` hands the rows' ``position_ids``
and the 2-D padding mask, no (B, 1, T, T) mask. fastft's training loss turns them into the rows'
sample layout (:mod:`fastft.ops.segments`) for its segment-aware attention when the model's
attention is routed through fastft (fused decoder layers included), and into the block-diagonal
mask of :func:`fastft.ops.segments.block_causal_mask` for Hugging Face's own attention otherwise
(``fastft.train.utils.attention_inputs``). With the same target tokens and no cross-sample
attention, the mean loss of a packed batch equals the unpacked one (``tests/test_data_packing.py``).

Why: the bundled instruction rows are ~40 tokens; padded to the longest in a batch of 8, about
half the compute is padding; packed into 256-token rows, almost none is.
"""
from __future__ import annotations

import torch

from fastft.data.collate import Collator
from fastft.errors import DataError

IGNORE = -100


def pack_examples(examples: list[dict], max_length: int, strategy: str = "ffd") -> list[dict]:
    """Pack token examples into rows of at most ``max_length`` tokens.

    Args:
        examples: dicts with ``input_ids`` and ``labels`` lists, each at most ``max_length`` long
            (apply ``excess_length`` first).
        strategy: ``"ffd"`` first-fit decreasing (fewest rows, reorders samples) or ``"sequential"``
            (keeps order, starts a new row when the next sample does not fit).

    Returns:
        Rows with ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 per sample) lists.
    """
    if strategy not in ("ffd", "sequential"):
        raise DataError(f"data.packing_strategy={strategy!r}: expected ffd or sequential")
    for i, e in enumerate(examples):
        if len(e["input_ids"]) > max_length:
            raise DataError(f"example {i} has {len(e['input_ids'])} tokens > max_length={max_length}; "
                            "apply data.excess_length before packing")
    bins: list[list[int]] = []
    if strategy == "sequential":
        used = 0
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            if not bins or used + n > max_length:
                bins.append([])
                used = 0
            bins[-1].append(i)
            used += n
    else:
        space: list[int] = []
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
        for i in order:
            n = len(examples[i]["input_ids"])
            for b, free in enumerate(space):
                if n <= free:
                    bins[b].append(i)
                    space[b] -= n
                    break
            else:
                bins.append([i])
                space.append(max_length - n)
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            e = examples[i]
            n = len(e["input_ids"])
            ids += e["input_ids"]
            labels += [IGNORE] + list(e["labels"][1:])
            pos += list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


class PackedCollator(Collator):
    """:class:`Collator` for packed rows: ``input_ids``, ``labels``, the 2-D padding
    ``attention_mask`` and ``position_ids`` (restarting at 0 per sample; the pad tail counts up
    like one more sample), all (B, T) int64; with ``cu_seqlens=True`` also ``cu_seqlens``
    ((N + 1,) int32, FlashAttention's varlen convention over the B * T flattened tokens, the pad
    tails counted as samples; fastft's loss accepts it in place of deriving it). No (B, 1, T, T)
    mask: a Hugging Face model given these directly must not get the 2-D mask alone (it would
    attend across samples) — fastft's loss takes care of that
    (``fastft.train.utils.attention_inputs``); elsewhere use :func:`fastft.ops.segments.block_causal_mask`.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, cu_seqlens: bool = False):
        super().__init__(pad_id, pad_to_multiple_of)
        self.cu_seqlens = cu_seqlens

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        if self.cu_seqlens and "position_ids" in batch:
            from fastft.ops.segments import segments_from_position_ids

            batch["cu_seqlens"] = segments_from_position_ids(batch["position_ids"],
                                                             batch["attention_mask"]).cu_seqlens()[0]
        return batch
