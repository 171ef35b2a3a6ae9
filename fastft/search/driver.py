"""``fastft.search.run``: a hyperparameter search over a ``fastft train`` config, on Optuna.

Order of work: every check that can fail on user input (config, space, metric, sampler, pruner,
storage URL, an existing study with another space) runs first; then the base model and the
tokenised data load; only then is anything written. Then trials run until the study holds
``trials`` of them (every worker's together), ``timeout`` passes, or the grid is done.

Samplers, pruners and storage are Optuna's (a well-kept library beats our own sampler/pruner/
storage); the trials themselves run in this process on the model loaded once
(:mod:`fastft.search.reuse`).
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from fastft.config import Config, from_dict, load_config
from fastft.errors import ConfigError, UserError
from fastft.search import storage as st
from fastft.search.objective import Outcome, run_config
from fastft.search.outputs import best_trial, params_text, write_best_yaml, write_plots, write_trials_csv
from fastft.search.reuse import TrialBuilder, changes_structure
from fastft.search.space import Space, apply_params, load_space

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "hyperband", "none")
DEFAULT_TRIALS = 20
# the median pruner compares with the median of earlier trials at the same step; Optuna's
# default waits for 5 finished trials, which a CPU search of 6-10 trials would barely reach
MEDIAN_STARTUP_TRIALS = 2


def make_sampler(name: str, space: Space, seed: int | None):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values):
            # GridSampler stops the study through Study.stop(), which only works inside
            # study.optimize(); our ask/tell loop stops by counting (--trials = the grid's size)
            return None

    return Grid(space.grid(), seed=seed)


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _base_config(config: str | Path | Config | dict | None, overrides: list[str] | None) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(config)
    return load_config(str(config) if config is not None else None, overrides or [])


def default_out(config) -> Path:
    stem = Path(config).stem if isinstance(config, (str, Path)) else "search"
    return Path("runs") / (stem if stem.startswith("search") else f"search-{stem}")


def _check_existing(study, base: Config, space: Space) -> None:
    """A rerun must search the same thing: else its trials would mix two experiments."""
    attrs = study.user_attrs
    if "fastft_space" in attrs and (attrs["fastft_space"] != space.to_dict()
                                    or attrs.get("fastft_config") != _comparable(base)):
        what = "space" if attrs["fastft_space"] != space.to_dict() else "config"
        raise UserError(f"study {study.study_name!r} in this storage was started with another {what}; "
                        "give another --study name or --out folder (or the original files)")


def _comparable(cfg: Config) -> dict:
    d = cfg.to_dict()
    d["output"] = {k: v for k, v in d["output"].items() if k != "dir"}
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("progress", "threads", "device")}
    return d


class _Heartbeat:
    """Optuna's heartbeat for a trial driven by ask/tell (RDB storage only)."""

    def __init__(self, study, trial_id: int):
        from optuna.storages import RDBStorage

        self.storage = study._storage if isinstance(study._storage, RDBStorage) else None
        self.trial_id, self.stop = trial_id, threading.Event()
        self.thread = None

    def __enter__(self):
        if self.storage is not None:
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self):
        while not self.stop.wait(st.HEARTBEAT_S):
            self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def run(config: str | Path | Config | dict | None, space: str | Path | dict, *, sampler: str = "tpe",
        trials: int | None = None, timeout: float | None = None, storage: str | None = None,
        study_name: str | None = None, out: str | Path | None = None, seed: int = 0,
        pruner: str | Any = "median", metric: str | None = None, direction: str | None = None,
        overrides: list[str] | None = None, plots: bool = True,
        log: Callable[[str], None] = print):
    """Search ``space`` around the ``fastft train`` config ``config``; returns the Optuna study.

    Args:
        config: a config YAML path, a ``Config``, a dict, or None (fastft's defaults);
            ``overrides`` are ``--section.key value`` tokens applied on top.
        space: a space YAML path or dict (see :mod:`fastft.search.space`).
        sampler: ``tpe`` | ``random`` | ``grid``; ``seed`` seeds it.
        trials: trials in the study in total (all workers, earlier runs included); default: the
            grid's size for ``grid``, else 20.
        timeout: seconds after which this process starts no new trial.
        storage: None (journal file ``<out>/study.journal``), a journal file path, or an Optuna
            RDB URL. study_name: default ``"search"``.
        out: output folder (default ``runs/search-<config name>``).
        pruner: ``median`` | ``halving`` | ``hyperband`` | ``none`` or an Optuna pruner object.
        metric, direction: override the space file's objective.
    Raises:
        ConfigError / UserError (one line) for bad input, before anything is loaded or written.
    """
    import optuna

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("fastft search under torchrun is not supported yet (trials are not broadcast across "
                        "ranks); run one `fastft search` per machine on a shared --storage URL instead")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if isinstance(pruner, str) and pruner not in PRUNERS:
        raise ConfigError(f"--pruner {pruner!r}: expected one of {', '.join(PRUNERS)}")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials {trials}: expected at least 1")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout {timeout}: expected a positive number of seconds")
    st.check_storage_arg(storage)
    base = _base_config(config, overrides)
    sp = load_space(space, base, metric, direction, grid=sampler == "grid")
    out = Path(out) if out is not None else default_out(config)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file")
    n_total = trials or (sp.grid_size() if sampler == "grid" else DEFAULT_TRIALS)
    if sampler == "grid" and n_total > sp.grid_size():
        log(f"search: the grid has {sp.grid_size()} points; running {sp.grid_size()} trials, not {n_total}")
        n_total = sp.grid_size()
    study_name = study_name or "search"
    journal = Path(storage) if storage and not st.is_url(storage) else out / "study.journal"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if st.is_url(storage) or journal.is_file():  # an existing study: same space and config?
        try:
            existing = optuna.load_study(study_name=study_name, storage=st.open_storage(storage, out))
            _check_existing(existing, base, sp)
        except KeyError:  # no study of that name yet
            pass
    for k, p in sp.params.items():  # a first trial's config must be valid before loading anything
        apply_params(base, {k: p.endpoints()[0]})

    # ---- load once: model + tokenised data (errors in model.path / data files surface here)
    lora_only = base.finetune.mode == "lora" and not changes_structure(sp.params)
    builder = TrialBuilder(log=log, lora_only=lora_only)
    t_load = time.perf_counter()
    builder.preload(base)
    load_s = time.perf_counter() - t_load

    # ---- now write: output folder, storage, study
    out.mkdir(parents=True, exist_ok=True)
    stor = st.open_storage(storage, out)
    lock = st.AskLock(storage, out)
    with lock:
        study = optuna.create_study(storage=stor, study_name=study_name, direction=sp.direction,
                                    sampler=optuna.samplers.RandomSampler(), load_if_exists=True)
        _check_existing(study, base, sp)
        if "fastft_space" not in study.user_attrs:
            study.set_user_attr("fastft_space", sp.to_dict())
            study.set_user_attr("fastft_config", _comparable(base))
        # each worker gets its own sampler seed (two workers with one seed would propose the
        # same parameters); the first worker of a study uses `seed` itself: reproducible
        worker_no = int(study.user_attrs.get("fastft_workers", 0))
        study.set_user_attr("fastft_workers", worker_no + 1)
    # (not for the grid: GridSampler shuffles the grid with its seed, and every worker must map a
    # grid id to the same point)
    offset = 1000 * worker_no if sampler != "grid" else 0
    study.sampler = make_sampler(sampler, sp, seed + offset if seed is not None else None)
    study.pruner = make_pruner(pruner) if isinstance(pruner, str) else pruner
    with lock:
        st.recover_interrupted(study, log)
    if base.train.eval_every == 0 and not isinstance(study.pruner, optuna.pruners.NopPruner):
        log("search: train.eval_every=0 evaluates only at the end of a trial; set it to let the pruner "
            "stop hopeless trials early")
    log(f"search: {sampler} over {', '.join(sp.params)}; {n_total} trials, objective {sp.metric} "
        f"({sp.direction}); study {study_name!r} in {journal if not st.is_url(storage) else storage}; "
        f"model and data loaded once in {load_s:.1f} s")

    from optuna.trial import TrialState

    dists = {k: p.distribution() for k, p in sp.params.items()}
    t_start, interrupted = time.perf_counter(), False
    while not interrupted:
        if timeout is not None and time.perf_counter() - t_start >= timeout:
            log(f"search: --timeout {timeout:g} s reached; no new trial started")
            break
        with lock:
            all_trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in all_trials)
            if not waiting and sum(st.counted(t) for t in all_trials) >= n_total:
                break
            with warnings.catch_warnings():  # RDB: "heartbeat is supposed to be used with optimize";
                warnings.filterwarnings("ignore", message="Heartbeat")  # _Heartbeat below beats for us
                trial = study.ask(fixed_distributions=dists)
            trial.set_user_attr(st.WORKER_ATTR, st.worker_id())
        params = dict(trial.params)
        cfg = apply_params_or_none(base, params)
        trial_dir = out / "trials" / f"{trial.number:04d}"
        try:
            with _Heartbeat(study, trial._trial_id):
                res = (run_config(cfg, trial_dir, builder, trial=trial, metric=sp.metric, log=log)
                       if cfg is not None else Outcome("failed", reason=_invalid_reason(base, params)))
        except KeyboardInterrupt:  # Ctrl-C outside the training loop (whose handler finishes the step)
            res = Outcome("interrupted", reason="interrupted (Ctrl-C) before training")
        interrupted = _tell(study, trial, res)
        write_trials_csv(study, sp, out / "trials.csv")
        write_best_yaml(study, base, sp, out)
        log(_progress_line(study, trial.number, params, res, sp, n_total))
    if plots:
        write_plots(study, out, log)
    best = best_trial(study)
    if best is not None:
        log(f"best: trial {best.number}, {sp.metric} {best.value:.6g}: {params_text(best.params)}; "
            f"config {out / 'best.yaml'}")
    else:
        log("best: no trial completed")
    if interrupted:
        raise KeyboardInterrupt
    return study


def apply_params_or_none(base: Config, params: dict) -> Config | None:
    try:
        return apply_params(base, params)
    except ConfigError:
        return None


def _invalid_reason(base: Config, params: dict) -> str:
    try:
        apply_params(base, params)
    except ConfigError as e:
        return f"invalid config: {e}"
    return "invalid config"


def _tell(study, trial, res: Outcome) -> bool:
    """Record the outcome; True when the search must stop (Ctrl-C)."""
    from optuna.trial import TrialState

    trial.set_user_attr("steps", res.steps)
    trial.set_user_attr("setup_s", round(res.setup_s, 3))
    trial.set_user_attr("train_s", round(res.train_s, 3))
    if res.reason:
        trial.set_user_attr(st.REASON_ATTR, res.reason)
    if res.state == "complete":
        study.tell(trial, res.value)
    elif res.state == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
    if res.state == "interrupted":  # like kill -9: the same parameters run again next time
        st.retry_callback()(study, study._storage.get_trial(trial._trial_id))
        return True
    return False


def _progress_line(study, number: int, params: dict, res: Outcome, sp: Space, n_total: int) -> str:
    from fastft.search.storage import counted

    done = sum(counted(t) and t.state.is_finished() for t in study.get_trials(deepcopy=False))
    head = f"trial {number} ({done}/{n_total}) {params_text(params)}"
    if res.state == "complete":
        what = f"{sp.metric} {res.value:.4g} in {res.steps} steps"
    elif res.state == "pruned":
        what = f"pruned at step {res.pruned_step}"
    else:
        what = f"{res.state}: {res.reason}"
    best = best_trial(study)
    tail = f"best {best.value:.4g} (trial {best.number})" if best is not None else "best: none yet"
    return f"{head} -> {what}; {tail}; {res.setup_s + res.train_s:.1f} s (setup {res.setup_s:.1f} s)"
