"""The rows ``fastft bench`` trains both sides on: one builder per workload.

Every workload gives fixed-length rows (``--seq`` tokens, no padding, no per-sample masks on
either side) cut from one long token stream, so the two sides see exactly the same positions:

* ``instruction``: the bundled instruction data tokenised by fastft's data pipeline with the
  prompts masked (17% of SmolLM2's positions carry loss): fine-tuning on chat data.
* ``text``: the bundled examples' text (instruction, input and answer) as plain text, each
  example followed by EOS, concatenated; every position is a target: pre-training-style data.
  fastft's head runs only on target positions, so this workload takes that advantage away.

A packed/collated workload (issue 20) would be one more entry in :data:`WORKLOADS` (and, if it
needs block masks, a ``collator`` name in the rows file that both runners read).

Token ids: the tokenizer's own when its vocabulary matches the model's; otherwise (a
``--model-config`` with another vocab size) seeded random ids in ``[0, vocab)`` at the same
positions and with the same label mask (:func:`randomize_ids`) - speed does not depend on which
ids they are, and a random-init model has no use for real text.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

IGNORE = -100
WORKLOAD_NAMES = ("instruction", "text")


def instruction_stream(tok, seq: int, seed: int) -> tuple[list[int], list[int], int]:
    """(ids, labels, examples): the bundled instruction data through fastft's pipeline, prompts masked."""
    from fastft.config import DataConfig
    from fastft.data import build_datasets

    bundle = build_datasets(DataConfig(max_length=seq, val_ratio=0.0, cache=False), tok, seed=seed)
    ids: list[int] = []
    labels: list[int] = []
    for e in bundle.train:
        ids += e["input_ids"]
        labels += e["labels"]
    return ids, labels, len(bundle.train)


def text_stream(tok, seq: int, seed: int) -> tuple[list[int], list[int], int]:
    """(ids, labels, examples): the bundled examples as plain text + EOS, every position a target."""
    from fastft.data import default_train_file

    rows = [json.loads(line) for line in open(default_train_file(), encoding="utf-8") if line.strip()]
    eos = tok.eos_token_id
    ids: list[int] = []
    for r in rows:
        text = "\n".join(x for x in (r.get("instruction", ""), r.get("input", ""), r.get("output", "")) if x)
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
    return ids, list(ids), len(rows)


WORKLOADS = {"instruction": instruction_stream, "text": text_stream}


def randomize_ids(ids: torch.Tensor, labels: torch.Tensor, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random ids in ``[0, vocab)`` at the same positions; labels follow the new ids where
    they carried a target and stay ``-100`` elsewhere. ids/labels: (R, T) int64."""
    g = torch.Generator().manual_seed(seed)
    new = torch.randint(0, vocab, ids.shape, generator=g, dtype=torch.long)
    return new, torch.where(labels != IGNORE, new, torch.full_like(labels, IGNORE))


def build_rows(workload: str, tok, seq: int, n_rows: int, seed: int, out: Path,
               model_vocab: int | None = None) -> dict:
    """Write ``n_rows`` rows of ``seq`` tokens of ``workload`` to ``out`` (with fastft's epoch-0
    order, which the HF side reads sequentially) and return the data stats, including
    ``target_fraction`` (positions with a target after the shift) and how the ids were made.

    ``model_vocab``: the model's vocabulary size when it may differ from the tokenizer's."""
    from fastft.train.trainer import epoch_order

    ids, labels, n_examples = WORKLOADS[workload](tok, seq, seed)
    n_tok = len(ids)
    if n_tok < seq:
        raise ValueError(f"the bundled data gives only {n_tok} tokens for workload {workload!r}, "
                         f"fewer than --seq {seq}")
    rows_avail = n_tok // seq
    idx = [i % rows_avail for i in range(n_rows)]  # repeat the data when the run needs more rows
    t_ids = torch.tensor(ids[:rows_avail * seq]).view(rows_avail, seq)[idx]
    t_lab = torch.tensor(labels[:rows_avail * seq]).view(rows_avail, seq)[idx]
    # a row must have a target after the shift; a row of only prompt tokens is rare but possible
    t_lab[:, -1] = torch.where((t_lab[:, 1:] != IGNORE).any(1), t_lab[:, -1], t_ids[:, -1])
    tok_vocab = len(tok)
    if model_vocab is None or model_vocab == tok_vocab:
        id_source = f"tokenizer ids (vocab {tok_vocab})"
    else:
        t_ids, t_lab = randomize_ids(t_ids, t_lab, model_vocab, seed)
        id_source = (f"random token ids in [0, {model_vocab}) (the tokenizer's vocab {tok_vocab} differs from "
                     f"the model's {model_vocab}); positions and label mask from the tokenised data")
    torch.save({"input_ids": t_ids.clone(), "labels": t_lab.clone(), "order": epoch_order(n_rows, seed, 0),
                "workload": workload}, out)
    return {"workload": workload, "examples": n_examples, "tokens": n_tok, "distinct_rows": rows_avail,
            "rows": n_rows, "seq": seq, "target_fraction": float((t_lab[:, 1:] != IGNORE).float().mean()),
            "ids": id_source}
