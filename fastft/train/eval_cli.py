"""``fastft eval``: loss/perplexity, or classification metrics, of a model (+ adapter) on a dataset.

Language-model formats (instruction, chat, prompt_completion, text) report the mean
cross-entropy over target tokens (the same tokens training scores: responses only unless
``--train-on-inputs``) and its exponential, the perplexity. ``classification`` loads a
sequence-classification checkpoint (its ``id2label`` gives the classes) and reports accuracy,
precision, recall and macro-F1; ``--output-dir`` also gets the confusion matrix. The data goes
through the same readers, cleaning and tokenisation as training (``fastft.data.load_file``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from fastft.errors import UserError

FORMATS = ("instruction", "chat", "prompt_completion", "text", "classification")


def _data_cfg(fmt: str, max_length: int, columns: str, chat_template: str, train_on_inputs: bool,
              on_bad_line: str = "error"):
    from fastft.config import DataConfig

    return DataConfig(format=fmt, max_length=max_length, train_on_inputs=train_on_inputs, on_bad_line=on_bad_line,
                      columns=[c.strip() for c in columns.split(",") if c.strip()], chat_template=chat_template)


def _load(data: str, fmt: str, tok, cfg, names=None):
    """``load_file`` with data errors that name eval's option, not the train config key."""
    from fastft.data import load_file
    from fastft.data.readers import SKIP_HINT
    from fastft.errors import DataError

    try:
        return load_file(data, fmt, tok, cfg, names)
    except DataError as e:
        raise DataError(str(e).replace(SKIP_HINT, "pass --on-bad-line skip to skip bad lines")) from None


def evaluate_lm(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Mean target-token cross-entropy and perplexity of a causal LM on token examples (the
    trainer's loop and loss: fastft/train/evaluation.py, fastft/models/loss.py)."""
    from fastft.data.collate import Collator
    from fastft.models.loss import CausalLMLoss
    from fastft.train.evaluation import lm_eval

    if not examples:
        raise UserError("the evaluation data has no examples")
    device = next(model.parameters()).device
    m = lm_eval(CausalLMLoss(model, 0.0, fused_ce=False), examples, Collator(pad_id), device, batch_size)
    return {"eval_loss": m["eval_loss"], "eval_ppl": m["eval_ppl"], "target_tokens": m["eval_tokens"],
            "examples": len(examples)}


def _load_classifier_checkpoint(model_path: str, adapter: str | None):
    """A trained sequence classifier: (model, tokenizer, label names from its config)."""
    from transformers import AutoModelForSequenceClassification

    from fastft.models.generate import merge_adapter
    from fastft.models.loading import load_tokenizer, materialize, resolve_package_path

    folder = materialize(resolve_package_path(model_path))
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model_path!r}: cannot load a sequence classifier ({str(e).splitlines()[0]})") from None
    if info.get("missing_keys") and not adapter:
        raise UserError(f"--model {model_path!r} has no trained classification head (missing "
                        f"{', '.join(sorted(info['missing_keys']))}); pass the fine-tuned model folder")
    if adapter:
        model = merge_adapter(model, adapter)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model.eval(), load_tokenizer(folder), names


def run_eval(model_path: str, data: str, fmt: str = "instruction", gguf_file: str | None = None,
             adapter: str | None = None, max_length: int = 256, batch_size: int = 8, columns: str = "",
             chat_template: str = "", train_on_inputs: bool = False, output_dir: str | None = None,
             on_bad_line: str = "error") -> dict:
    """Programmatic ``fastft eval``; returns the metrics dict (also written to ``output_dir``)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if batch_size < 1 or max_length < 8:
        raise UserError(f"--batch-size {batch_size} / --max-length {max_length}: expected >= 1 / >= 8")
    if not Path(data.rsplit("::", 1)[0] if "::" in data else data).exists():  # "<dataset dir>::<split>"
        raise UserError(f"--data {data!r}: no such file or directory")
    cfg = _data_cfg(fmt, max_length, columns, chat_template, train_on_inputs, on_bad_line)
    if fmt == "classification":
        from fastft.train.evaluation import evaluate_classifier

        from fastft.models.generate import resolve_trained

        model_path, _, adapter = resolve_trained(model_path, None, adapter)
        model, tok, names = _load_classifier_checkpoint(model_path, adapter)
        examples, counts = _load(data, fmt, tok, cfg, names)
        if not examples:
            raise UserError(f"--data {data!r}: no examples to evaluate")
        metrics = evaluate_classifier(model, examples, names, tok.pad_token_id or 0, batch_size, output_dir)
        metrics["examples"] = len(examples)
    else:
        from fastft.models.generate import load_for_inference

        model, tok = load_for_inference(model_path, gguf_file, adapter)
        examples, counts = _load(data, fmt, tok, cfg)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        metrics = evaluate_lm(model, examples, pad, batch_size)
    metrics["data"] = {k: v for k, v in counts.items() if v}
    if output_dir:
        from fastft.train.metrics import atomic_write

        atomic_write(Path(output_dir) / "eval_metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_path", default="default", show_default=True,
              help="fastft run dir (or its final/, a checkpoint), local HF folder (a fine-tuned classifier for --format classification), .gguf, hub id, "
                   "'default', or pkg:<package>/<dir>")
@click.option("--gguf-file", default=None, help="GGUF file name inside --model (a folder)")
@click.option("--adapter", default=None, help="LoRA adapter directory (PEFT format) merged into the model")
@click.option("--data", "data", required=True, help="JSONL/JSON/CSV/Parquet file or `datasets` directory")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="instruction", show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True, help="longer rows are truncated (counted)")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--columns", default="", help="column mapping name=column,... (as data.columns)")
@click.option("--chat-template", default="", help="chat format: Jinja template (text or file)")
@click.option("--train-on-inputs", is_flag=True, help="score prompt tokens too")
@click.option("--output-dir", default=None, help="write eval_metrics.json (and the confusion matrix) here")
@click.option("--on-bad-line", type=click.Choice(("error", "skip")), default="error", show_default=True,
              help="malformed JSONL line: stop, naming file:line, or skip it (counted)")
def eval_cmd(model_path, gguf_file, adapter, data, fmt, max_length, batch_size, columns, chat_template,
             train_on_inputs, output_dir, on_bad_line) -> None:
    """Evaluate a model (+ adapter) on a dataset: loss/perplexity or classification metrics.
    --model may be a fastft run dir, its final/ or a checkpoint folder."""
    m = run_eval(model_path, data, fmt, gguf_file, adapter, max_length, batch_size, columns, chat_template,
                 train_on_inputs, output_dir, on_bad_line)
    if fmt == "classification":
        from fastft.train.metrics import format_metrics

        click.echo(format_metrics({**m, "n": m["examples"]}) + f" eval_loss={m['eval_loss']:.4f}")
    else:
        click.echo(f"eval_loss={m['eval_loss']:.4f} eval_ppl={m['eval_ppl']:.3f} "
                   f"target_tokens={m['target_tokens']} examples={m['examples']}")
    if m["data"]:
        click.echo(f"data: {m['data']}")
