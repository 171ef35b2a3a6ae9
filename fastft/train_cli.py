"""``fastft train [CONFIG.yaml] [--section.key value ...] [--resume] [--overwrite]``.

Everything that can fail on user input (config, model path, data, run directory) is checked
before the run directory is created, so a bad invocation leaves nothing behind.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path

import click

from fastft.config import Config, describe_keys, load_config, save_config
from fastft.errors import ConfigError, UserError


def _help_epilog() -> str:
    lines = ["\b", "Config keys (YAML sections or --section.key value overrides):"]
    for key, default, help_ in describe_keys():
        lines.append(f"  --{key} (default {default}): {help_}")
    return "\n".join(lines)


def split_args(args: list[str]) -> tuple[str | None, list[str], bool, bool]:
    """(config path, override tokens, resume, overwrite) from the raw arguments."""
    config, overrides, resume, overwrite = None, [], False, False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--resume":
            resume = True
        elif a == "--overwrite":
            overwrite = True
        elif a.startswith("--"):
            overrides.append(a)
            # a value never starts with "--": `--train.lr --output.dir x` lacks lr's value
            if "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
                overrides.append(args[i + 1])
                i += 1
        elif config is None and not overrides:
            config = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give one CONFIG file, then --section.key value overrides")
        i += 1
    return config, overrides, resume, overwrite


def resolve_config(config: str | None, overrides: list[str], resume: bool) -> Config:
    """The run's config: defaults <- CONFIG <- overrides; with ``resume``, the run's saved
    ``config.yaml`` <- the keys the user gave, which may only change what is safe to change."""
    if not resume:
        return load_config(config, overrides)
    from fastft.config import given_keys, load_resume_config

    run_dir = given_keys(config, overrides).get("output.dir")
    if not run_dir:
        raise ConfigError("--resume needs the run to continue: fastft train --output.dir RUN_DIR --resume")
    return load_resume_config(run_dir, config, overrides)


def resume_command(run_dir: Path) -> str:
    """The exact command that continues ``run_dir``: its saved config.yaml carries the settings."""
    import shlex

    return f"fastft train --output.dir {shlex.quote(str(run_dir))} --resume"


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.finetune.mode}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber a previous run; returns the checkpoint to resume from (or None)."""
    from fastft.checkpoint import list_checkpoints

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        ckpts = list_checkpoints(run_dir / "checkpoints")
        if not ckpts:
            raise UserError(f"--resume: no checkpoint under {run_dir / 'checkpoints'} (set output.dir to the run)")
        return ckpts[-1]
    if exists and not overwrite:
        raise UserError(f"run directory {str(run_dir)!r} already holds a run; pass --overwrite to replace it "
                        "or --resume to continue it")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output.dir={str(run_dir)!r} is a file")
    return None


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: Config, bundle=None):
    """Load model + tokenizer + data and set up the fine-tuning mode. Returns
    (model, tokenizer, bundle, device). A given ``bundle`` (a ``DataBundle`` of already tokenised
    rows, e.g. ``fastft bench``'s fixed-length batches) replaces the data described by ``cfg.data``."""
    import torch

    from fastft import distributed as dist
    from fastft.data import build_datasets
    from fastft.finetune import apply_freezing, setup_lora
    from fastft.model_loading import load_model_and_tokenizer
    from fastft.train_utils import resolve_device, resolve_dtype, unwrap

    from fastft.data import preflight

    if bundle is None:  # fail on unreadable data before the slow model load
        preflight(cfg.data)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would bury fastft's own output
    # an unsupported distributed mix fails here, before the slow model load
    dist.check_supported(dist.resolve_strategy(cfg.train.distributed, cfg.finetune.mode), cfg)
    device = dist.local_device(resolve_device(cfg.train.device))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dist.init(device, cfg.train.distributed_timeout)
    dtype = resolve_dtype(cfg.model.dtype, device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("model.dtype=fp16: fp16 with loss scaling needs a GPU; use bf16 or fp32 on CPU")
    seed_everything(cfg.train.seed)
    new_params: list[str] = []
    if cfg.data.format == "classification":
        # the label set (from the data) sizes the new head, so the data comes first
        from fastft.data.classification import load_classifier, resolve_package_path
        from fastft.model_loading import load_tokenizer, materialize

        tok = load_tokenizer(materialize(resolve_package_path(cfg.model.path), cfg.model.gguf_file))
        bundle = build_datasets(cfg.data, tok, seed=cfg.train.seed)
        seed_everything(cfg.train.seed)
        model, tok, new_params = load_classifier(cfg.model.path, bundle.label_names, dtype=dtype,
                                                 gguf_file=cfg.model.gguf_file,
                                                 attn_implementation=cfg.model.attn_implementation)
    else:
        model, tok, _ = load_model_and_tokenizer(cfg.model.path, cfg.model.gguf_file, dtype=dtype,
                                                 attn_implementation=cfg.model.attn_implementation,
                                                 dropout=cfg.model.dropout,
                                                 int8_base=cfg.lora.int8_base and cfg.finetune.mode == "lora")
        if bundle is None:
            bundle = build_datasets(cfg.data, tok, seed=cfg.train.seed)
    if cfg.model.fused_blocks:
        _patch_blocks(model, cfg.model.fused_attention, cfg.model.fused_layers)
    if cfg.model.gradient_checkpointing:
        lm = unwrap(model)  # transformers 5 renamed it; keep working on 4.x
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.finetune.mode == "lora":
        model = setup_lora(model, cfg.lora, cfg.model.gradient_checkpointing)
    apply_freezing(model, cfg.finetune)
    if new_params:  # a new classification head trains in every mode
        from fastft.data.classification import mark_trainable

        mark_trainable(model, new_params)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"finetune: mode={cfg.finetune.mode!r} with these regex/freeze settings leaves "
                          "no parameter to train")
    from fastft.precision import keep_fp32_weights

    keep_fp32_weights(model, cfg.finetune)  # trainable embeddings/norms in fp32 (fastft/precision.py)
    if dtype != torch.float32 and cfg.finetune.mode != "lora" and cfg.data.format != "classification":
        from fastft.model_loading import materialize
        from fastft.precision import attach_fp32_sources

        # fp32 masters/embeddings from the fp32 source, as HF's fp32 weights (fastft/precision.py)
        attach_fp32_sources(model, materialize(cfg.model.path, cfg.model.gguf_file, None))
    model = model.to(device)
    if dist.world_size() > 1:  # weights and LoRA init are identical on every rank; dropout is not
        dist.seed_ranks(cfg.train.seed)
    return model, tok, bundle, device


def _rows_phrase(stats: dict, max_length: int) -> str:
    """What one batch row is: a sequence, or a packed row of several samples."""
    if not stats.get("packed_samples"):
        return "sequences"
    rows = max(1, stats.get("train", 1))
    return (f"packed rows (<= {max_length} tokens; {stats['packed_samples']} samples in {rows} rows, "
            f"{stats['packed_samples'] / rows:.1f} per row)")


def _patch_blocks(model, attention: bool = True, layers: bool = True) -> None:
    """Fused RMSNorm/SwiGLU/RoPE (and causal attention) in supported Llama-family blocks
    (fastft/hf_fast.py); other architectures run HF's code, said once."""
    from fastft import hf_fast

    if hf_fast.supported(model):
        hf_fast.patch_blocks(model, attention=attention, layers=layers)
    else:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        click.echo(f"model.fused_blocks: architecture {mt!r} not supported "
                   f"({', '.join(hf_fast.SUPPORTED_MODEL_TYPES)}); running HF's blocks")


def run(config: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False,
        metrics_hook=None) -> dict:
    """Programmatic ``fastft train``; returns the trainer summary plus ``run_dir``."""
    from fastft import distributed as dist
    from fastft.finetune import param_table
    from fastft.trainer import Trainer

    cfg = resolve_config(config, overrides, resume)
    if overwrite:
        cfg.output.overwrite = True
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    cfg.output.dir = str(run_dir)
    ckpt = check_run_dir(run_dir, resume, cfg.output.overwrite)
    model, tok, bundle, device = build(cfg)
    if metrics_hook is None:  # classification metrics / per-task losses from the data side
        from fastft.metrics import make_metrics_hook

        metrics_hook = make_metrics_hook(bundle, run_dir, tok.pad_token_id or 0, cfg.train.batch_size)
    trainer = Trainer(cfg, run_dir, model, tok, bundle, device, metrics_hook=metrics_hook, log=click.echo)
    if ckpt is not None:  # loads (and checks) weights and state before anything in the run dir changes
        trainer.resume_from(ckpt)
    if dist.is_main():  # all validation passed: now touch the disk
        if ckpt is not None:
            from fastft.checkpoint import remove_debris

            remove_debris(run_dir)  # half-written folders of a crashed save
        if run_dir.exists() and cfg.output.overwrite and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        table = param_table(model)
        (run_dir / "params.txt").write_text(table + "\n")
        click.echo(table)
        click.echo(f"data: {bundle.stats}; {trainer.total_steps} steps of {cfg.train.batch_size}x"
                   f"{cfg.train.grad_accum} {_rows_phrase(bundle.stats, cfg.data.max_length)}; run dir {run_dir}")
    dist.barrier()
    try:
        summary = trainer.train()
    except ConfigError:
        if ckpt is None and trainer.step == 0 and dist.is_main():  # found before any training: leave nothing
            if trainer.tb is not None:
                trainer.tb.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except Exception as e:  # a dead rank: one line, not every rank's collective traceback
        lost = dist.lost_rank_error(e, cfg.train.distributed_timeout)
        if lost is None:
            raise
        raise lost from e
    summary["run_dir"] = str(run_dir)
    if dist.is_main():
        before, after = summary.get("eval_before", {}), summary.get("eval_after", {})
        if summary["interrupted"]:
            click.echo(f"interrupted at step {summary['steps']}; checkpoint saved. Resume with: "
                       f"{resume_command(run_dir)}")
        if before or after:
            fmt = lambda d: f"{d['eval_loss']:.4f} (ppl {d['eval_ppl']:.2f})" if d else "n/a"  # noqa: E731
            last, bs = summary.get("eval_last"), summary.get("best_step")
            if last and after is not last:  # final/ holds the best checkpoint's weights
                tail = f" (best, step {bs}; last, step {summary['steps']}: {fmt(last)})"
            elif bs is not None and bs != summary["steps"]:
                tail = f" (last; the best evaluation was step {bs}'s: {cfg.train.early_stopping_metric} {summary['best']:.4g})"
            else:
                tail = ""
            click.echo(f"held-out loss before: {fmt(before)}  after: {fmt(after)}{tail}")
        if summary.get("test"):
            t = summary["test"]
            click.echo(f"test loss: {t['test_loss']:.4f} (ppl {t['test_ppl']:.2f})")
        from fastft.plot import NO_MATPLOTLIB, write_curves

        try:
            click.echo(f"curves: {write_curves(run_dir) or NO_MATPLOTLIB}")
        except UserError as e:  # e.g. interrupted before the first logged step
            click.echo(f"curves: none ({e})")
        click.echo(f"run dir: {run_dir}")
    dist.cleanup()
    return summary


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]},
               epilog=_help_epilog())
@click.argument("args", nargs=-1, type=click.UNPROCESSED,
                metavar="[CONFIG.yaml] [--section.key value ...] [--resume] [--overwrite]")
def train(args: tuple[str, ...]) -> None:
    """Fine-tune a model. CONFIG is an optional YAML file; `--section.key value` overrides any
    key; `--resume` continues the run in output.dir; `--overwrite` replaces it. With no
    arguments: LoRA on the embedded SmolLM2-135M-Instruct with the bundled instruction data.
    """
    from fastft.distributed import RankLost

    config, overrides, resume, overwrite = split_args(list(args))
    try:
        summary = run(config, overrides, resume, overwrite)
    except RankLost as e:
        click.echo(f"error: {e}", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # leave now: tearing the process group down would wait on the dead rank
    if summary.get("interrupted"):
        raise SystemExit(130)
