"""Alpaca-style instruction data (``instruction``/``input``/``output``) with the prompt masked.

Each row is rendered with the tokenizer's chat template when it has one (the instruction and
input as the user turn, the output as the assistant turn), else with the Alpaca text template.
Prompt and response are tokenised separately and concatenated, so the label mask falls exactly
on the response boundary; the response always ends with EOS, which is trained (labels carry
explicit ids, so pad == eos does not mask it).
"""
from __future__ import annotations

import json
from pathlib import Path

from fastft.errors import DataError

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
REQUIRED = ("instruction", "output")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; DataError naming file:line on malformed JSON or a non-object row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return rows


def render(row: dict, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) of one instruction row (response without EOS)."""
    instruction, inp, output = str(row["instruction"]), str(row.get("input") or ""), str(row["output"])
    if getattr(tokenizer, "chat_template", None):
        user = instruction if not inp else f"{instruction}\n\n{inp}"
        msgs = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": output}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    input_block = f"### Input:\n{inp}\n\n" if inp else ""
    return ALPACA_PROMPT.format(instruction=instruction, input_block=input_block), output


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_row(row: dict, tokenizer, max_length: int, train_on_inputs: bool = False) -> dict:
    """One example: ``input_ids`` and ``labels`` (lists of int, same length <= max_length)."""
    prompt, response = render(row, tokenizer)
    p = _ids(tokenizer, prompt)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False) and not p[:1] == [tokenizer.bos_token_id]:
        p = [tokenizer.bos_token_id] + p
    r = _ids(tokenizer, response)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in r:
        r = r + [eos]  # the model must learn to stop
    ids = (p + r)[:max_length]
    labels = (list(p) if train_on_inputs else [-100] * len(p)) + r
    return {"input_ids": ids, "labels": labels[:max_length]}


def load_instruction_file(path: str | Path, tokenizer, max_length: int, train_on_inputs: bool = False):
    """Tokenised examples of a JSONL file and the count of rows dropped (no target token left
    after truncation). DataError on missing columns, naming the columns that exist."""
    rows = read_jsonl(path)
    out, dropped = [], 0
    for i, row in enumerate(rows, 1):
        missing = [c for c in REQUIRED if c not in row]
        if missing:
            raise DataError(f"{path}: row {i} lacks column(s) {', '.join(missing)} "
                            f"(has: {', '.join(sorted(row)) or 'nothing'})")
        ex = tokenize_row(row, tokenizer, max_length, train_on_inputs)
        if all(x == -100 for x in ex["labels"]):
            dropped += 1
            continue
        out.append(ex)
    return out, dropped
