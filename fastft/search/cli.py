"""``fastft search CONFIG.yaml --space SPACE.yaml [options] [--section.key value ...]``."""
from __future__ import annotations

import click

from fastft.search.driver import PRUNERS, SAMPLERS


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("config", required=False, metavar="[CONFIG.yaml]")
@click.option("--space", required=True, metavar="SPACE.yaml",
              help="config keys with distributions (fastft/search/space.py: float/int/categorical)")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="tpe", show_default=True)
@click.option("--trials", type=int, default=None,
              help="trials in the study in total, all workers and earlier runs included [default: grid size, or 20]")
@click.option("--timeout", type=float, default=None, help="seconds after which no new trial starts")
@click.option("--storage", default=None, metavar="URL|FILE",
              help="Optuna RDB URL (postgresql://, mysql://, sqlite:///) or journal file [default: OUT/study.journal]")
@click.option("--study", "study_name", default="search", show_default=True, help="study name in the storage")
@click.option("--out", default=None, metavar="DIR", help="output folder [default: runs/search-<config name>]")
@click.option("--seed", type=int, default=0, show_default=True, help="sampler seed")
@click.option("--pruner", type=click.Choice(PRUNERS), default="median", show_default=True)
@click.option("--metric", default=None, help="objective metric [default: the space file's, else "
              "train.early_stopping_metric]")
@click.option("--direction", type=click.Choice(("minimize", "maximize")), default=None,
              help="[default: from the metric]")
@click.option("--no-plots", is_flag=True, help="do not draw PNG plots at the end")
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--section.key value ...]")
def search(config, space, sampler, trials, timeout, storage, study_name, out, seed, pruner, metric, direction,
           no_plots, overrides):
    """Hyperparameter search (grid, random, TPE) with pruning, on Optuna; the model loads once.

    Rerun the same command to continue a study (after Ctrl-C or kill -9: finished trials are
    kept, the interrupted one runs again); start several on one --storage to run trials in
    parallel. Writes OUT/trials.csv, OUT/best.yaml (run it with `fastft train OUT/best.yaml`)
    and OUT/plots/*.png.
    """
    from fastft.search.driver import run

    overrides = list(overrides)
    if config is not None and config.startswith("--"):  # no CONFIG: the first override landed here
        config, overrides = None, [config, *overrides]
    run(config, space, sampler=sampler, trials=trials, timeout=timeout, storage=storage, study_name=study_name,
        out=out, seed=seed, pruner=pruner, metric=metric, direction=direction, overrides=overrides,
        plots=not no_plots, log=click.echo)
