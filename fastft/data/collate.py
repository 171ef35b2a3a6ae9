"""Pad lists of token ids into batch tensors."""
from __future__ import annotations

import torch


class Collator:
    """Right-pad examples into ``input_ids``/``attention_mask``/``labels`` (all ``(B, T)`` int64).

    Token examples carry ``input_ids`` and ``labels`` lists (labels -100 where masked); packed
    rows may add ``position_ids`` (restarting at 0 per sample); their pad tail counts 0, 1, ...
    like one more sample (so position ids alone never split it into 1-token samples). Classification
    examples carry ``input_ids`` and an int ``label``; their ``labels`` is ``(B,)``.
    ``pad_to_multiple_of`` rounds T up (e.g. 8 for tensor cores).
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = int(pad_id)
        self.multiple = max(1, int(pad_to_multiple_of))

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Collator got an empty batch")
        T = max(len(e["input_ids"]) for e in examples)
        T = -(-T // self.multiple) * self.multiple
        B = len(examples)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        token_labels = "labels" in examples[0]
        labels = torch.full((B, T), -100, dtype=torch.long) if token_labels else None
        positions = torch.zeros((B, T), dtype=torch.long) if "position_ids" in examples[0] else None
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            if token_labels:
                labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
            if positions is not None:
                positions[i, :n] = torch.as_tensor(e["position_ids"], dtype=torch.long)
                positions[i, n:] = torch.arange(T - n)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_labels:
            out["labels"] = labels
        elif "label" in examples[0]:
            out["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        if positions is not None:
            out["position_ids"] = positions
        return out
