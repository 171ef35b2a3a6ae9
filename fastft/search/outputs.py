"""What a search leaves in its output folder, and the line it prints per trial.

* ``trials.csv``: one row per trial of the study (every worker's), rewritten atomically after
  each trial: number, state, the metric, duration, steps, where it was pruned, why it failed,
  then one column per searched key.
* ``best.yaml``: the complete config of the best COMPLETE trial (never a pruned or failed one,
  so never one whose metric was NaN) with ``output.dir`` pointing into the search folder:
  ``fastft train best.yaml`` runs it as is and reproduces the trial (same seed).
* ``plots/*.png``: optimisation history, parameter importances, parallel coordinates, drawn by
  Optuna's matplotlib visualisation (matplotlib is optional: one line says it is missing).
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import yaml

from fastft.config import Config
from fastft.search.space import Space, apply_params
from fastft.search.storage import REASON_ATTR
from fastft.train.metrics import atomic_write


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def params_text(params: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def best_trial(study):
    """The best COMPLETE trial with a finite value, or None (Optuna's ``best_trial`` raises)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    sign = 1.0 if study.direction.name == "MINIMIZE" else -1.0
    return min(done, key=lambda t: (sign * t.value, t.number))


def write_trials_csv(study, space: Space, path: Path) -> None:
    keys = list(space.params)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", space.metric, "duration_s", "steps", "pruned_step", "reason", *keys])
    for t in study.get_trials(deepcopy=False):
        dur = t.duration.total_seconds() if t.duration is not None else ""
        pruned = t.last_step if t.state.name == "PRUNED" else ""
        w.writerow([t.number, t.state.name.lower(), "" if t.value is None else repr(t.value),
                    f"{dur:.2f}" if dur != "" else "", t.user_attrs.get("steps", ""),
                    "" if pruned is None else pruned, t.user_attrs.get(REASON_ATTR, ""),
                    *[t.params.get(k, "") for k in keys]])
    atomic_write(path, buf.getvalue())


def write_best_yaml(study, base: Config, space: Space, out: Path) -> Path | None:
    """``out/best.yaml`` from the best trial; None when no trial completed."""
    t = best_trial(study)
    if t is None:
        return None
    cfg = apply_params(base, t.params)
    cfg.output.dir = str(out / "best-run")
    header = (f"# best trial {t.number} of search study {study.study_name!r}: {space.metric} = {t.value!r} "
              f"({space.direction})\n# {params_text(t.params)}\n"
              f"# run it: fastft train {out / 'best.yaml'}\n")
    path = out / "best.yaml"
    atomic_write(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def write_plots(study, out: Path, log) -> list[Path]:
    """PNG plots via optuna.visualization.matplotlib; skipped (one line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ov
    except ImportError:
        log("plots: matplotlib is not installed (pip install matplotlib); no PNG plots written")
        return []
    from optuna.trial import TrialState

    n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    from optuna.importance import PedAnovaImportanceEvaluator

    def importances(s):
        # PED-ANOVA (Optuna 5's default) needs no scikit-learn; Optuna 4's default fANOVA does
        return ov.plot_param_importances(s, evaluator=PedAnovaImportanceEvaluator())

    plots = [("optimization_history", ov.plot_optimization_history, 1),
             ("param_importances", importances, 2),
             ("parallel_coordinate", ov.plot_parallel_coordinate, 1)]
    folder = out / "plots"
    written = []
    for name, fn, need in plots:
        if n_done < need:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning on every call
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            folder.mkdir(parents=True, exist_ok=True)
            fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(folder / f"{name}.png")
        except Exception as e:  # e.g. importances of a parameter that never varied
            log(f"plots: {name} not drawn ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
    return written
