"""``fastft plot RUN_DIR``: ``<run>/curves.png`` from ``<run>/metrics.jsonl``.

Panels against the optimizer step: training loss (raw and an exponential moving average),
evaluation loss and the other evaluation metrics, learning rate, gradient norm (log scale) and
tokens/s. The trainer draws it at the end of every run. matplotlib is optional
(``pip install matplotlib`` or ``pip install fastft[plot]``): without it ``write_curves`` returns
None and callers print ``NO_MATPLOTLIB`` once instead.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from fastft.errors import UserError

NO_MATPLOTLIB = "plots need matplotlib: pip install matplotlib (or fastft[plot]), then fastft plot RUN_DIR"
SMOOTH = 0.9  # EMA weight of the smoothed training loss (TensorBoard's default slider value 0.6-0.9)


def have_matplotlib() -> bool:
    try:  # an import, not find_spec: a broken or blocked install counts as missing
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a killed run) is ignored."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def ema(xs: list[float], w: float = SMOOTH) -> list[float]:
    """Bias-corrected exponential moving average (non-finite values are skipped)."""
    out, acc, norm = [], 0.0, 0.0
    for x in xs:
        if math.isfinite(x):
            acc, norm = w * acc + (1 - w) * x, w * norm + (1 - w)
        out.append(acc / norm if norm else float("nan"))
    return out


def _series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in recs if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw ``curves.png`` (default ``<run_dir>/curves.png``); None when matplotlib is missing.

    Raises:
        UserError: no metrics.jsonl in ``run_dir``, or it has no training step.
    """
    run_dir = Path(run_dir)
    src = run_dir / "metrics.jsonl"
    if not src.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a fastft run directory?)")
    recs = read_metrics(src)
    train = [r for r in recs if r.get("event") == "train"]
    evals = [r for r in recs if r.get("event") == "eval"]
    if not train:
        raise UserError(f"{src}: no training steps logged yet")
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(14, 7))
    ax = ax.ravel()
    s, loss = _series(train, "loss")
    ax[0].plot(s, loss, color="#9ecae1", lw=0.8, label="raw")
    ax[0].plot(s, ema(loss), color="#08519c", lw=1.5, label=f"EMA {SMOOTH}")
    ax[0].set_title("training loss")
    bad = [r["step"] for r in train if r.get("bad")]
    if bad:
        ax[0].plot(bad, [min(v for v in loss if math.isfinite(v))] * len(bad), "rx", label="skipped (non-finite)")
    ax[0].legend(fontsize=8)
    s, v = _series(evals, "eval_loss")
    ax[1].plot(s, v, "o-", color="#d9534f")
    ax[1].set_title("eval loss")
    others = sorted({k for r in evals for k, x in r.items() if isinstance(x, (int, float))
                     and k not in ("step", "eval_loss", "eval_ppl", "eval_tokens")})
    for k in others:
        s, v = _series(evals, k)
        ax[2].plot(s, v, "o-", label=k, ms=3)
    ax[2].set_title("eval metrics" if others else "eval metrics (none besides the loss)")
    if others:
        ax[2].legend(fontsize=7)
    for i, (key, title, log) in enumerate((("lr", "learning rate", False), ("grad_norm", "grad norm (pre-clip)", True),
                                           ("tokens_per_s", "tokens/s", False))):
        s, v = _series(train, key)
        ok = [(a, b) for a, b in zip(s, v) if math.isfinite(b)]
        ax[3 + i].plot([a for a, _ in ok], [b for _, b in ok], color="#31a354", lw=1)
        if log and ok and all(b > 0 for _, b in ok):
            ax[3 + i].set_yscale("log")
        ax[3 + i].set_title(title)
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    tmp = out.with_name(f".{out.name}.tmp.png")  # a reader never sees half a PNG
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)
    return out


@click.command("plot", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
def plot_cmd(run_dir: str, out: str | None) -> None:
    """Draw RUN_DIR/curves.png: train loss (raw, smoothed), eval loss/metrics, lr, grad norm, tokens/s."""
    path = write_curves(run_dir, out)
    click.echo(f"wrote {path}" if path else NO_MATPLOTLIB)
