"""The training config: dataclasses with defaults, validation, YAML and dotted CLI overrides.

Every key lives in one place below with its help text (``fastft train --help`` prints them).
``load_config("run.yaml", ["--lora.r", "8"])`` reads YAML, applies overrides with type coercion
and validates; an unknown key raises ConfigError suggesting the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastft.errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False):
    """A dataclass field with the metadata validation and ``--help`` use."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt("default", "local HF folder, .gguf file, cached hub id, or 'default' (SmolLM2-135M-Instruct GGUF)")
    gguf_file: str | None = opt(None, "GGUF file name inside model.path (a folder)")
    dtype: str = opt("auto", "weight dtype: auto (bf16 if supported), bf16 (frozen bf16 + fp32 trainable masters), "
                     "fp32, fp16 (GPU, loss scaling)", choices=("auto", "bf16", "fp32", "fp16"))
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    attn_implementation: str = opt("sdpa", "attention implementation passed to transformers",
                                   choices=("sdpa", "eager", "flash_attention_2"))
    dropout: float | None = opt(None, "override the model's attention/hidden dropout (None keeps the config)",
                                min=0.0, max=0.99)
    fused_ce: bool = opt(True, "fused linear cross-entropy (never materialises the logits)")
    fused_blocks: bool = opt(True, "fused RMSNorm/SwiGLU/RoPE kernels in Llama-family blocks")
    fused_attention: bool = opt(True, "fastft's causal attention kernel for SDPA calls in fused blocks, "
                                "packed/right-padded rows included (other masks and KV caches keep HF's SDPA)")
    fused_layers: bool = opt(True, "whole decoder layers with frozen weights (LoRA) as one autograd node "
                             "(fused blocks and attention; fastft/models/fused_layer.py)")
    recompute_cheap: bool = opt(True, "rebuild RMSNorm/SwiGLU outputs in backward instead of saving them "
                                "(fused blocks; ~157 MB less for SmolLM2 full at 4x256 bf16)")


@dataclass
class FinetuneConfig:
    mode: str = opt("lora", "full | partial (freeze embeddings/bottom layers/regex) | lora | head (head only)",
                    choices=("full", "partial", "lora", "head"))
    freeze_embeddings: bool = opt(True, "partial: freeze the input embeddings")
    freeze_layers: int = opt(0, "partial: freeze the bottom N transformer layers", min=0)
    trainable_regex: str = opt("", "partial: only parameters whose name matches this regex train")
    frozen_regex: str = opt("", "any mode: parameters whose name matches this regex are frozen")
    unfreeze_after_steps: int = opt(0, "progressive unfreezing: after this many steps every parameter of the "
                                    "model trains (full/partial/head; 0 = never)", min=0)
    backbone_lr_scale: float = opt(1.0, "lr multiplier for pretrained weights (heads/adapters get train.lr)",
                                   min=0.0, min_exclusive=True)
    layer_lr_decay: float = opt(1.0, "layer-wise lr decay: layer i gets lr * decay**(num_layers-1-i)",
                                min=0.0, max=1.0, min_exclusive=True)


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank", min=1)
    alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with use_rslora)",
                       min=0.0, min_exclusive=True)
    dropout: float = opt(0.05, "dropout on the LoRA input", min=0.0, max=0.99)
    target_modules: list[str] = opt(["q_proj", "v_proj"], "module names that get adapters (comma-separated)")
    int8_base: bool = opt(False, "quantise the frozen base linears to int8 (QLoRA-style, 8-bit)")
    use_rslora: bool = opt(False, "rank-stabilised scaling alpha / sqrt(r)")


@dataclass
class DataConfig:
    train_file: str = opt("", "training data (JSONL); empty = the bundled instruction set")
    validation_file: str = opt("", "validation data; empty = split val_ratio off the training file")
    test_file: str = opt("", "test data (evaluated at the end when given)")
    format: str = opt("instruction", "data format: instruction (instruction/input/output), chat (messages), "
                      "prompt_completion, text (plain causal LM), classification (text/label)",
                      choices=("instruction", "chat", "prompt_completion", "text", "classification"))
    max_length: int = opt(256, "truncate sequences to this many tokens", min=8)
    val_ratio: float = opt(0.1, "fraction held out for validation when no validation_file", min=0.0, max=0.5)
    train_on_inputs: bool = opt(False, "also train on prompt tokens (default: only the response)")
    # -- keys below added by the data engineer (readers, cleaning, chat, packing, mixing, classification)
    columns: list[str] = opt([], "column mapping fastft_name=file_column, e.g. text=review,label=stars")
    on_bad_line: str = opt("error", "malformed JSONL line: error (stop, naming file:line) or skip (warn, count)",
                           choices=("error", "skip"))
    excess_length: str = opt("truncate", "sequences longer than max_length: truncate, drop or error (counted)",
                             choices=("truncate", "drop", "error"))
    chat_template: str = opt("", "chat format: Jinja template (text or file) overriding the tokenizer's")
    strip: bool = opt(False, "strip leading/trailing whitespace of text fields")
    normalize_whitespace: bool = opt(False, "collapse whitespace runs (newlines too) to one space")
    lowercase: bool = opt(False, "lower-case text fields")
    drop_empty: bool = opt(True, "drop rows whose required text is empty (counted)")
    drop_duplicates: bool = opt(False, "drop rows whose text fields repeat an earlier row (counted)")
    test_ratio: float = opt(0.0, "fraction held out as test split when no test_file", min=0.0, max=0.5)
    packing: bool = opt(False, "pack several samples per training row (per-sample positions; attention "
                         "kept inside each sample)")
    tasks: list[str] = opt([], "extra datasets mixed into training, name=path (same format); train_file is task 'main'")
    mix_weights: list[str] = opt([], "task weights name=weight (default: temperature sampling)")
    mix_temperature: float = opt(1.0, "temperature sampling of tasks: share ~ size^(1/T) (1 = proportional)",
                                 min=0.0, min_exclusive=True)
    label_names: list[str] = opt([], "classification: class names in head order (default: sorted training labels)")
    cache: bool = opt(True, "cache tokenised data under $FASTFT_CACHE/data (keyed by data+tokenizer+settings)")


@dataclass
class TrainConfig:
    batch_size: int = opt(8, "micro-batch size (sequences per forward)", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    max_steps: int = opt(0, "optimizer steps (0 = use epochs)", min=0)
    epochs: float = opt(2.0, "passes over the training data when max_steps = 0", min=0.0, min_exclusive=True)
    lr: float = opt(2e-4, "peak learning rate", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.0, "AdamW weight decay (never applied to biases, norms or embeddings)", min=0.0)
    adam_beta1: float = opt(0.9, "AdamW beta1", min=0.0, max=0.9999)
    adam_beta2: float = opt(0.999, "AdamW beta2", min=0.0, max=0.99999)
    adam_eps: float = opt(1e-8, "AdamW epsilon", min=0.0, min_exclusive=True)
    warmup_steps: int = opt(0, "linear warmup steps (overrides warmup_ratio when > 0)", min=0)
    warmup_ratio: float = opt(0.0, "warmup as a fraction of the total steps", min=0.0, max=0.99)
    scheduler: str = opt("cosine", "lr schedule after warmup", choices=("linear", "cosine", "constant"))
    max_grad_norm: float = opt(1.0, "clip the global gradient norm (0 = no clipping)", min=0.0)
    master_format: str = opt("split", "fp32 masters of trainable bf16 weights: split (the bf16 weight is the "
                             "master's high half, +2 bytes/param for the low half; bit-identical updates, "
                             "ties round away from zero) or fp32 (a separate 4-byte copy)",
                             choices=("split", "fp32"))
    seed: int = opt(0, "seed for model init, data order and dropout")
    eval_every: int = opt(0, "evaluate every N steps (0 = only before and after training)", min=0)
    eval_batches: int = opt(0, "limit each evaluation to N batches (0 = whole validation set)", min=0)
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end)", min=0)
    keep_last: int = opt(2, "keep the last K step checkpoints (the best is kept as well)", min=1)
    log_every: int = opt(1, "write a metrics.jsonl train line every N steps", min=1)
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy", min=0.0, max=0.99)
    early_stopping_metric: str = opt("eval_loss", "metric for early stopping / best checkpoint "
                                     "(eval_loss, eval_ppl, or a metric from the metrics hook)")
    early_stopping_mode: str = opt("min", "whether the metric should go down or up", choices=("min", "max"))
    early_stopping_patience: int = opt(0, "stop after N evaluations without improvement (0 = off)", min=0)
    early_stopping_min_delta: float = opt(0.0, "improvement smaller than this does not count", min=0.0)
    load_best_at_end: bool = opt(True, "with early stopping: final/ gets the best checkpoint's weights "
                                 "(the end-of-run evaluation counts)")
    max_bad_steps: int = opt(5, "stop (exit code 3) after this many bad steps in a row: non-finite loss or grad "
                             "norm (the step is skipped), a grad-norm spike, or a zero grad norm", min=1)
    grad_norm_spike: float = opt(1000.0, "a grad norm above this many times the median of the last 20 steps "
                                 "counts as a bad step (0 = off)", min=0.0)
    device: str = opt("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, "CPU threads for torch (0 = torch's default, one per core)", min=0)
    progress: bool = opt(True, "show a progress bar")
    distributed: str = opt("auto", "under torchrun: ddp (whole model per rank), fsdp (FSDP2, sharded) or none; "
                           "auto = nothing for one process, fsdp for finetune.mode=full, else ddp",
                           choices=("auto", "none", "ddp", "fsdp"))
    distributed_timeout: float = opt(600.0, "seconds a collective waits for the other ranks before the job "
                                     "fails (a dead rank ends the run instead of hanging it)",
                                     min=0.0, min_exclusive=True)


@dataclass
class OutputConfig:
    dir: str = opt("", "run directory (empty = runs/<mode>-<timestamp>)")
    overwrite: bool = opt(False, "replace an existing run directory")
    save_merged: bool = opt(False, "LoRA: also save the merged model in HF format")
    tensorboard: bool = opt(True, "write TensorBoard events when tensorboard is installed")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = {f.name: f for f in dataclasses.fields(Config)}[section].default_factory
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(section_obj) -> dict:
    return typing.get_type_hints(type(section_obj))


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key, in declaration order (for ``--help``)."""
    cfg = Config()
    rows = []
    for s in SECTIONS:
        for name, f in _section_fields(s).items():
            help_ = f.metadata["help"]
            if f.metadata.get("choices"):
                help_ += f" [{'|'.join(f.metadata['choices'])}]"
            rows.append((f"{s}.{name}", repr(getattr(getattr(cfg, s), name)), help_))
    return rows


# names other trainers (HF TrainingArguments, PEFT, torchtune) use for our keys: spelling
# similarity alone sent train.learning_rate to train.early_stopping_patience
ALIASES = {"learning_rate": "train.lr", "lr_scheduler": "train.scheduler", "lr_scheduler_type": "train.scheduler",
           "num_train_epochs": "train.epochs", "num_epochs": "train.epochs", "steps": "train.max_steps",
           "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
           "gradient_accumulation_steps": "train.grad_accum", "gradient_accumulation": "train.grad_accum",
           "max_grad_norm": "train.max_grad_norm", "grad_clip": "train.max_grad_norm", "clip": "train.max_grad_norm",
           "warmup": "train.warmup_steps", "eval_steps": "train.eval_every", "save_steps": "train.save_every",
           "logging_steps": "train.log_every", "save_total_limit": "train.keep_last", "rank": "lora.r",
           "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
           "output_dir": "output.dir", "model_name_or_path": "model.path", "max_seq_length": "data.max_length",
           "max_len": "data.max_length", "seq_len": "data.max_length", "torch_dtype": "model.dtype"}


def _unknown(key: str) -> ConfigError:
    """An unknown key, with the valid key it most likely means (none rather than a far one)."""
    sec, _, tail = key.rpartition(".")
    keys = all_keys()
    near = [ALIASES[tail]] if tail in ALIASES else []
    near = near or [k for k in keys if k.split(".")[-1] == tail][:1]  # right key, wrong/missing section
    if not near and sec in SECTIONS:  # compare names within the section: "train." matched everything
        tails = difflib.get_close_matches(tail, list(_section_fields(sec)), n=1, cutoff=0.6)
        near = [f"{sec}.{tails[0]}"] if tails else []
    elif not near and sec:  # misspelt section: fix it, then look for the key there
        secs = difflib.get_close_matches(sec, SECTIONS, n=1, cutoff=0.6)
        if secs and tail in _section_fields(secs[0]):
            near = [f"{secs[0]}.{tail}"]
        near = near or difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    elif not near:
        near = difflib.get_close_matches(tail, [k.split(".")[-1] for k in keys], n=1, cutoff=0.75)
        near = [k for k in keys if near and k.endswith("." + near[0])][:1]
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML or CLI value to the field type, or raise ConfigError naming key and value."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    bad = ConfigError(f"{key}={value!r}: expected {getattr(typ, '__name__', str(typ))}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}={value!r}: expected a list of strings")
        return list(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise bad
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError:
            raise bad from None
    if typ is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if typ is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    raise bad


def set_key(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS or parts[1] not in _section_fields(parts[0]):
        raise _unknown(key)
    section = getattr(cfg, parts[0])
    setattr(section, parts[1], coerce(key, value, _hints(section)[parts[1]]))


def _flatten(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    out = {}
    for sec, body in data.items():
        if str(sec) not in SECTIONS:
            if isinstance(body, dict):
                raise _unknown(f"{sec}.{next(iter(body), '')}") if body else _unknown(str(sec))
            raise _unknown(str(sec))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section {sec!r} must be a mapping, got {body!r}")
        for k, v in body.items():
            out[f"{sec}.{k}"] = v
    return out


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["--lora.r", "8", "--train.lr=1e-4"]`` -> [("lora.r", "8"), ("train.lr", "1e-4")]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) <= 2:
            raise ConfigError(f"unexpected argument {a!r}: overrides look like --section.key value")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} needs a value")
            value, i = args[i + 1], i + 2
        out.append((key.replace("-", "_"), value))
    return out


def validate(cfg: Config) -> None:
    """Check ranges and choices of every key and the cross-key rules; ConfigError on the first problem."""
    for s in SECTIONS:
        section = getattr(cfg, s)
        for name, f in _section_fields(s).items():
            v, m, key = getattr(section, name), f.metadata, f"{s}.{name}"
            if v is None:
                continue
            if m.get("choices") and v not in m["choices"]:
                raise ConfigError(f"{key}={v!r}: expected one of {', '.join(m['choices'])}")
            if m.get("min") is not None and (v < m["min"] or (m["min_exclusive"] and v == m["min"])):
                rel = ">" if m["min_exclusive"] else ">="
                raise ConfigError(f"{key}={v!r}: expected a value {rel} {m['min']}")
            if m.get("max") is not None and v > m["max"]:
                raise ConfigError(f"{key}={v!r}: expected a value <= {m['max']}")
    t = cfg.train
    if t.max_steps and t.warmup_steps >= t.max_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps}: warmup must be shorter than the run "
                          f"(train.max_steps={t.max_steps})")
    if t.early_stopping_patience and not t.eval_every:
        raise ConfigError(f"train.early_stopping_patience={t.early_stopping_patience} needs evaluations during "
                          "training: set train.eval_every (e.g. 50)")
    if cfg.finetune.mode == "lora" and not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules=[]: expected at least one module name")
    if cfg.lora.int8_base and cfg.finetune.mode != "lora":
        raise ConfigError(f"lora.int8_base=true needs finetune.mode=lora (got {cfg.finetune.mode!r})")
    if cfg.model.dtype == "fp16" and t.device == "cpu":
        raise ConfigError("model.dtype=fp16: fp16 with loss scaling is for GPUs; use bf16 or fp32 on CPU")
    for key in ("trainable_regex", "frozen_regex"):
        import re

        try:
            re.compile(getattr(cfg.finetune, key))
        except re.error as e:
            raise ConfigError(f"finetune.{key}={getattr(cfg.finetune, key)!r}: not a valid regex ({e})") from None


def read_yaml_keys(path: str) -> dict[str, Any]:
    """The dotted keys a YAML config file sets (unvalidated); ConfigError naming line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({what})") from None
    return _flatten(data, path)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``--section.key value`` overrides, then validated."""
    cfg = Config()
    if path:
        for k, v in read_yaml_keys(path).items():
            set_key(cfg, k, v)
    for k, v in parse_overrides(overrides or []):
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    cfg = Config()
    for k, v in _flatten(data, "config").items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".config", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)


# What a resumed run may change: how long it runs, how often it evaluates/saves/logs, early
# stopping, and display. Everything else (model, data, lr, batch, LoRA, ...) defines the run and
# comes from its saved config.yaml.
RESUME_SAFE = ("train.max_steps", "train.epochs", "train.eval_every", "train.eval_batches", "train.save_every",
               "train.keep_last", "train.log_every", "train.early_stopping_metric", "train.early_stopping_mode",
               "train.early_stopping_patience", "train.early_stopping_min_delta", "train.load_best_at_end",
               "train.max_bad_steps", "train.grad_norm_spike", "train.progress", "train.threads",
               "output.tensorboard", "output.save_merged",
               "output.dir", "output.overwrite",
               # a resume on another number of ranks splits the global batch anew (per-rank batch x
               # accumulation x ranks); the data position is recomputed (fastft/train/dist_checkpoint.py)
               "train.batch_size", "train.grad_accum", "train.distributed", "train.distributed_timeout")


def given_keys(path: str | None, overrides: list[str] | None) -> dict[str, Any]:
    """The dotted keys the user set explicitly (YAML file, then overrides), unvalidated."""
    out = dict(read_yaml_keys(path)) if path else {}
    out.update(parse_overrides(overrides or []))
    return out


def load_resume_config(run_dir: str | os.PathLike, path: str | None, overrides: list[str] | None) -> Config:
    """The config of a resumed run: ``<run_dir>/config.yaml`` as saved, then the user's keys,
    which may only change ``RESUME_SAFE`` keys (ConfigError naming the first other key that differs)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found (is output.dir={str(run_dir)!r} a fastft run?)")
    cfg = Config()
    for k, v in read_yaml_keys(str(saved)).items():
        set_key(cfg, k, v)
    for k, v in given_keys(path, overrides).items():
        sec, _, name = k.partition(".")
        old = getattr(getattr(cfg, sec), name) if sec in SECTIONS and name in _section_fields(sec) else None
        set_key(cfg, k, v)
        new = getattr(getattr(cfg, sec), name)
        if new != old and k not in RESUME_SAFE:
            raise ConfigError(f"--resume: {k}={new!r} differs from the run's saved config.yaml ({old!r}); a resumed "
                              "run may only change max_steps/epochs, eval/save/log cadence, early stopping and "
                              "progress (start a new run to change it)")
    cfg.output.dir = str(run_dir)
    validate(cfg)
    return cfg
