"""``fastft train [CONFIG.yaml] [--section.key value ...] [--resume] [--overwrite]``.

Everything that can fail on user input (config, model path, data, run directory) is checked
before the run directory is created, so a bad invocation leaves nothing behind.
"""
from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from pathlib import Path

import click

from fastft.config import Config, describe_keys, load_config, save_config
from fastft.errors import ConfigError, UserError
from fastft.runtime import release_free_heap
from fastft.train.recipe import Recipe, seed_everything  # noqa: F401  (seed_everything: callers import it here)


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
    from fastft.train.checkpoint import list_checkpoints

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


def build(cfg: Config, bundle=None):
    """Load model + tokenizer + data and set up the fine-tuning mode through the stages of
    :class:`fastft.train.Recipe`. Returns (model, tokenizer, bundle, device). A given ``bundle``
    (a ``DataBundle`` of already tokenised rows, e.g. ``fastft bench``'s fixed-length batches)
    replaces the data described by ``cfg.data``."""
    recipe = Recipe(cfg, log=click.echo)
    recipe.load(check_data=bundle is None)
    recipe.data(bundle)
    recipe.adapt()
    return recipe.model, recipe.tokenizer, recipe.bundle, recipe.device


def _rows_phrase(stats: dict, max_length: int) -> str:
    """What one batch row is: a sequence, or a packed row of several samples."""
    if not stats.get("packed_samples"):
        return "sequences"
    rows = max(1, stats.get("train", 1))
    return (f"packed rows (<= {max_length} tokens; {stats['packed_samples']} samples in {rows} rows, "
            f"{stats['packed_samples'] / rows:.1f} per row)")


def run(config: str | None, overrides: list[str], resume: bool = False, overwrite: bool = False,
        metrics_hook=None) -> dict:
    """Programmatic ``fastft train``; returns the trainer summary plus ``run_dir``."""
    from fastft.train import distributed as dist
    from fastft.train.finetune import param_table

    cfg = resolve_config(config, overrides, resume)
    if overwrite:
        cfg.output.overwrite = True
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    cfg.output.dir = str(run_dir)
    ckpt = check_run_dir(run_dir, resume, cfg.output.overwrite)
    recipe = Recipe(cfg, log=click.echo)
    recipe.load()
    bundle = recipe.data()
    model = recipe.adapt()
    # classification metrics / per-task losses from the data side when no hook is given
    trainer = recipe.make_trainer(run_dir, metrics_hook)
    seed_everything(cfg.train.seed)  # as Recipe.train: dropout masks do not depend on the load
    if ckpt is not None:  # loads (and checks) weights and state before anything in the run dir changes
        trainer.resume_from(ckpt)
    if dist.is_main():  # all validation passed: now touch the disk
        if ckpt is not None:
            from fastft.train.checkpoint import remove_debris

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
    # the run's tensors are done with: released before the report and the curves plot, whose
    # matplotlib import and figure (~25 MB) then reuse that memory instead of raising the peak RSS
    recipe = trainer = model = bundle = None
    gc.collect()
    release_free_heap()
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
        from fastft.train.plot import NO_MATPLOTLIB, write_curves

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
    from fastft.train.distributed import RankLost

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
