"""One trial: its config, its model (from ``TrialBuilder``), the trainer, and the outcome.

The trainer is fastft's own ``Trainer`` with three changes for a search (``SearchTrainer``):
every evaluation's metric is reported to Optuna and the pruner may stop the trial there; the
step-0 evaluation is skipped unless early stopping needs it (it is the same for every LoRA trial
and nothing reads it; evaluating uses no RNG, so skipping it changes nothing that follows); and
no checkpoints or final weights are written (a search of 20 full fine-tunes would write 20
models; ``best.yaml`` retrains the winner). Each trial keeps ``metrics.jsonl`` and its
``config.yaml`` in ``<out>/trials/<number>/``.

Outcomes: ``complete`` (the metric of the final evaluation — what ``fastft train`` prints for
the same config), ``pruned`` (at a step), ``failed`` with a reason (diverged: non-finite loss or
metric; out of memory; a sampled combination the config rejects), ``interrupted`` (Ctrl-C).
"""
from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastft.config import Config, save_config
from fastft.errors import ConfigError, TrainingDiverged, UserError
from fastft.train import seed_everything
from fastft.train.trainer import Trainer


class Diverged(Exception):
    """A non-finite loss or metric: the trial fails, never becomes a best."""


@dataclass
class Outcome:
    state: str  # complete | pruned | failed | interrupted
    value: float | None = None
    steps: int = 0
    pruned_step: int | None = None
    reason: str = ""
    setup_s: float = 0.0  # building the model/trainer: the per-trial overhead of the search
    train_s: float = 0.0  # train + eval steps
    attrs: dict = field(default_factory=dict)


class SearchTrainer(Trainer):
    """``Trainer`` that reports each evaluation's ``metric`` to an Optuna trial (see module doc)."""

    def __init__(self, *args, trial=None, metric: str = "eval_loss", **kwargs):
        super().__init__(*args, **kwargs)
        self.trial, self.metric = trial, metric
        self.reported: dict[int, float] = {}

    def evaluate(self, examples=None, hook: bool = True) -> dict:
        if examples is None and self.step == 0 and not self.t.early_stopping_patience:
            return {}
        out = super().evaluate(examples, hook)
        if examples is not None or not hook or not out:
            return out
        v = out.get(self.metric)
        if v is None:
            raise ConfigError(f"metric {self.metric!r}: the evaluation reports {', '.join(out)}")
        v = float(v)
        if not math.isfinite(v):
            raise Diverged(f"{self.metric} is {v} at step {self.step}")
        if self.trial is not None and self.step not in self.reported:
            import optuna

            self.reported[self.step] = v
            self.trial.report(v, self.step)
            if self.step < self.total_steps and self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {self.step} ({self.metric} {v:.4g})")
        return out

    def _save(self, rng: dict, best: bool = False) -> None:  # no checkpoints in a search
        return None

    def _final_save(self) -> None:  # no weights: best.yaml retrains the winner
        return None


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def run_config(cfg: Config, run_dir: Path, builder, trial=None, metric: str = "eval_loss",
               log=print) -> Outcome:
    """Train ``cfg`` (the trial's user-facing config) in ``run_dir``; never raises for the
    trial's own failures (divergence, OOM, a rejected combination) — they come back as the
    Outcome. Errors in the search itself (a bug, a missing file) propagate."""
    import optuna

    from fastft.train.evaluation import make_metrics_hook

    run_cfg = copy.deepcopy(cfg)
    run_cfg.output.dir, run_cfg.output.tensorboard, run_cfg.train.progress = str(run_dir), False, False
    t0 = time.perf_counter()
    trainer, t1 = None, None

    def timed(o: Outcome) -> Outcome:
        now = time.perf_counter()
        o.setup_s = (t1 or now) - t0
        o.train_s = 0.0 if t1 is None else now - t1
        return o

    try:
        model, tok, bundle, device = builder.build(run_cfg)
        hook = make_metrics_hook(bundle, run_dir, tok.pad_token_id or 0, run_cfg.train.batch_size)
        trainer = SearchTrainer(run_cfg, run_dir, model, tok, bundle, device, metrics_hook=hook,
                                log=lambda s: None, trial=trial, metric=metric)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        t1 = time.perf_counter()
        seed_everything(run_cfg.train.seed)  # as Recipe.train / fastft train: dropout from the seed
        summary = trainer.train()
        out = timed(Outcome("complete", steps=summary["steps"]))
        if summary["interrupted"]:
            out.state, out.reason = "interrupted", f"interrupted (Ctrl-C) at step {summary['steps']}"
            return out
        v = summary.get("eval_after", {}).get(metric)
        t = run_cfg.train
        if t.early_stopping_patience and getattr(t, "load_best_at_end", False) and trainer.best_metrics:
            # fastft train keeps the best evaluation's weights then and reports that evaluation
            v = trainer.best_metrics.get(metric, v)
        if v is None or not math.isfinite(float(v)):
            out.state, out.reason = "failed", f"diverged: {metric} is {v} after {summary['steps']} steps"
            return out
        out.value = float(v)
        return out
    except optuna.TrialPruned as e:
        step = trainer.step if trainer is not None else 0
        return timed(Outcome("pruned", steps=step, pruned_step=step, reason=str(e)))
    except (FloatingPointError, Diverged, TrainingDiverged) as e:
        step = trainer.step if trainer is not None else 0
        return timed(Outcome("failed", steps=step, reason=f"diverged: {e}"))
    except ConfigError as e:  # a sampled combination the config or the trainer rejects
        return timed(Outcome("failed", reason=f"invalid config: {e}"))
    except UserError:
        raise
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        step = trainer.step if trainer is not None else 0
        return timed(Outcome("failed", steps=step,
                             reason=f"out of memory at step {step}: {str(e).splitlines()[0][:120]}"))
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
