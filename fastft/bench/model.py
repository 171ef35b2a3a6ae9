"""The model folders ``fastft bench`` gives both sides: a real model, or a random one from a config.

``--model`` (default: the embedded SmolLM2-135M-Instruct) is materialised as local HF folders, an
fp32 one and a bf16 one (for a GGUF source the bf16 one is fastft's 16-bit cache copy; for a
folder both are the folder).

``--model-config FILE.json`` (a Hugging Face ``config.json``: e.g. ``benchmarks/configs/``) builds
a randomly initialised model from it instead (seeded, fp32, saved once in fastft's cache so every
side loads the same weights the way it loads any checkpoint). Real weights do not
travel to a GPU machine, and speed does not need them. The rows are tokenised with ``--model``'s
tokenizer when it can be loaded, else with a word-level tokenizer built from the bundled data
(no download; the GPU machines do not have the SmolLM2 package); when that tokenizer's vocabulary
differs from the config's, the rows get random ids (``fastft.bench.data.randomize_ids``).
"""
from __future__ import annotations

import json
from pathlib import Path

import click


def bundled_word_tokenizer(vocab_words: int = 4000):
    """A word-level tokenizer trained on the bundled instruction data (< 1 s, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastft.data import default_train_file

    specials = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                pre_tokenizers.WhitespaceSplit()])
    texts = []
    for line in open(default_train_file(), encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            texts += [r.get("instruction", ""), r.get("input", ""), r.get("output", ""), "user assistant system"]
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_words, special_tokens=specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<unk>")
    # the ChatML template the bundled data is formatted with (what SmolLM2's tokenizer uses)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def read_model_config(path: str):
    """A transformers config from a JSON file; one-line ClickException on a bad file."""
    from transformers import AutoConfig

    try:
        d = json.loads(Path(path).read_text())
        model_type = d.pop("model_type")
        return AutoConfig.for_model(model_type, **d)
    except FileNotFoundError:
        raise click.ClickException(f"--model-config {path}: file not found") from None
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise click.ClickException(f"--model-config {path}: not a transformers config.json "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def tokenizer_for(model: str):
    """(tokenizer, description): ``model``'s tokenizer, or the bundled word-level one when
    ``model`` cannot be loaded here (e.g. the SmolLM2 package is not installed)."""
    from fastft.errors import UserError
    from fastft.models.loading import load_tokenizer, materialize

    try:
        folder = materialize(model)
        return load_tokenizer(folder), f"the tokenizer of {model} ({folder})"
    except (UserError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return bundled_word_tokenizer(), f"a word-level tokenizer of the bundled data ({model} unavailable: {msg[:120]})"


def build_random_model(config_path: str, tok, seed: int) -> str:
    """A seeded random-init fp32 model of ``config_path`` (with ``tok``) as an HF folder in fastft's
    cache (``$FASTFT_CACHE/bench-random-init/<config name>-<hash of config text and seed>``), built
    once and shared by later runs (a LoRA and a full run of the GPU check build a 1B model once)."""
    import hashlib
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from fastft.models.loading import cache_dir

    cfg = read_model_config(config_path)
    text = Path(config_path).read_text()
    key = {"config": text, "seed": seed, "tokenizer": [getattr(tok, "name_or_path", ""), len(tok)]}
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
    out = cache_dir() / "bench-random-init" / f"{Path(config_path).stem}-{digest}"
    if (out / "config.json").is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        try:
            os.replace(tmp, out)
        except OSError:  # another run won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def prepare_models(model: str, model_config: str | None, seed: int) -> tuple[dict, object, dict]:
    """(folders {"fp32", "bf16"}, tokenizer, info) for the run; ``info`` says where they came from
    and, for a config, the model's vocab size (``vocab``) for the rows' ids."""
    import torch

    from fastft.models.loading import load_tokenizer, materialize

    if model_config:
        cfg = read_model_config(model_config)  # fail on a bad file before building anything
        tok, tok_desc = tokenizer_for(model)
        folder = build_random_model(model_config, tok, seed)
        return ({"fp32": folder, "bf16": folder}, tok,
                {"source": f"random init (seed {seed}) from {model_config}", "tokenizer": tok_desc,
                 "vocab": int(cfg.vocab_size), "folder": folder})
    folder = materialize(model)
    folders = {"fp32": folder, "bf16": materialize(model, dtype=torch.bfloat16)}
    tok = load_tokenizer(folder)
    return folders, tok, {"source": model, "tokenizer": f"the tokenizer of {model}", "vocab": None, "folder": folder}
