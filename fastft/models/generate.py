"""``fastft generate``: text from a base model, optionally with a LoRA adapter.

The prompt is rendered with the tokenizer's chat template (``--template auto`` uses it when the
tokenizer has one; ``chat`` requires it; ``raw`` feeds the prompt as is). Decoding is greedy
(``--greedy`` or ``--temperature 0``) or sampled with temperature and nucleus (top-p) filtering,
seeded. The adapter (PEFT format, as ``fastft train`` saves it) is merged into the weights once
after loading, so generation runs at base-model speed.
"""
from __future__ import annotations

import sys

import click

from fastft.errors import UserError

TEMPLATES = ("auto", "chat", "raw")


def load_for_inference(model_path: str, gguf_file: str | None, adapter: str | None, dtype: str = "fp32"):
    """(model in eval mode, tokenizer) with the adapter merged in when given."""
    import torch

    from fastft.models.loading import load_model_and_tokenizer

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    from fastft.models.loading import resolve_package_path

    model_path, gguf_file, adapter = resolve_trained(model_path, gguf_file, adapter)
    model, tok, _ = load_model_and_tokenizer(resolve_package_path(model_path), gguf_file, dtype=dtypes[dtype])
    if adapter:
        model = merge_adapter(model, adapter)
    return model.eval(), tok


def resolve_trained(model_path: str, gguf_file: str | None, adapter: str | None):
    """(model path, gguf file, adapter) for a fastft output given as ``--model``: a run dir, its
    ``final/`` or a checkpoint folder hold ``model/`` (full fine-tuning) or ``adapter/`` (LoRA,
    whose base model is the run's ``model.path`` in its config.yaml). Anything else is returned as is."""
    from pathlib import Path

    p = Path(model_path)
    if not p.is_dir() or (p / "config.json").is_file() or gguf_file:
        return model_path, gguf_file, adapter
    if (p / "final").is_dir() and not (p / "model").is_dir() and not (p / "adapter").is_dir():
        p = p / "final"  # the run directory itself
    if (p / "model" / "config.json").is_file():
        return str(p / "model"), None, adapter
    if not (p / "adapter" / "adapter_config.json").is_file() or adapter:
        return model_path, gguf_file, adapter
    for run in (p.parent, p.parent.parent):  # <run>/final, <run>/checkpoints/step-N
        if (run / "config.yaml").is_file():
            import yaml

            m = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") or {}
            if m.get("path"):
                return str(m["path"]), m.get("gguf_file"), str(p / "adapter")
    raise UserError(f"--model {model_path!r} holds a LoRA adapter, and no run config.yaml names its base model: "
                    f"pass the base model as --model and --adapter {p / 'adapter'}")


def merge_adapter(model, adapter: str):
    """Load a PEFT-format LoRA adapter directory into ``model`` and merge it into the weights."""
    import os

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise UserError(f"--adapter {adapter!r}: no adapter_config.json there (expected a PEFT-format "
                        "adapter directory, e.g. <run>/final/adapter or <run>/checkpoints/step-N/adapter)")
    import warnings

    from fastft.errors import ConfigError
    from fastft.models.lora import load_adapter, merge_lora

    try:  # fastft's own PEFT-format loader: peft is only a test dependency
        load_adapter(model, adapter)
    except (UserError, ConfigError, ValueError, KeyError) as e:
        raise UserError(f"--adapter {adapter!r} does not fit this model ({str(e).splitlines()[0]})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return merge_lora(model)


def render_prompt(tokenizer, prompt: str, system: str | None, template: str) -> tuple[str, bool]:
    """(text fed to the model, whether it is chat-rendered). A chat-rendered text already holds
    the special tokens it needs, so it is tokenised without adding BOS again."""
    if template not in TEMPLATES:
        raise UserError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_template:
        raise UserError("--template chat: the tokenizer has no chat template (use --template raw)")
    if template == "raw" or not has_template:
        return (prompt if not system else f"{system}\n\n{prompt}"), False
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """UserError naming the option when a decoding setting is out of range."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: expected >= 1")
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: expected >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: expected a value in (0, 1]")


def generate_text(model, tokenizer, text: str, max_new_tokens: int = 128, temperature: float = 0.7,
                  top_p: float = 0.9, greedy: bool = False, seed: int = 0, chat: bool = True) -> str:
    """Continue ``text``; returns only the new text (special tokens removed). ``temperature`` 0 or
    ``greedy`` decode greedily; ``chat`` (text already chat-rendered) skips adding BOS."""
    import torch

    check_sampling(max_new_tokens, temperature, top_p)
    ids = tokenizer(text, add_special_tokens=not chat, return_tensors="pt")
    device = next(model.parameters()).device
    sample = not greedy and temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device),
                             **kwargs)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt", required=False)
@click.option("--model", "model_path", default="default", show_default=True,
              help="local HF folder, .gguf file, cached hub id, or 'default' (SmolLM2-135M-Instruct)")
@click.option("--gguf-file", default=None, help="GGUF file name inside --model (a folder)")
@click.option("--adapter", default=None, help="LoRA adapter directory (PEFT format) to merge in")
@click.option("--system", default=None, help="system message (chat template) or preamble (raw)")
@click.option("--template", type=click.Choice(TEMPLATES), default="auto", show_default=True,
              help="auto: chat template when the tokenizer has one; chat: require it; raw: no template")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=0.9, show_default=True, help="nucleus sampling mass")
@click.option("--greedy", is_flag=True, help="greedy decoding (ignores temperature/top-p)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
def generate(prompt, model_path, gguf_file, adapter, system, template, max_new_tokens, temperature, top_p,
             greedy, seed, dtype) -> None:
    """Generate a reply to PROMPT (read from stdin when omitted)."""
    if prompt is None:
        if sys.stdin.isatty():
            raise UserError("no PROMPT given (pass it as an argument or on stdin)")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UserError("the prompt is empty")
    check_sampling(max_new_tokens, temperature, top_p)  # before spending seconds on loading
    model, tok = load_for_inference(model_path, gguf_file, adapter, dtype)
    text, chat = render_prompt(tok, prompt, system, template)
    click.echo(generate_text(model, tok, text, max_new_tokens, temperature, top_p, greedy, seed, chat))
