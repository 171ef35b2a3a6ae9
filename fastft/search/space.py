"""The search-space file of ``fastft search``: config keys with distributions, checked up front.

A space file is YAML; each dotted config key maps to a distribution::

    metric: eval_loss            # optional: default train.early_stopping_metric of the config
    direction: minimize          # optional: default from the metric (loss/ppl down, accuracy/F1 up)
    train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}
    train.warmup_steps: {type: int, low: 0, high: 10, step: 2}
    lora.r: {type: categorical, choices: [8, 16, 32]}
    lora.target_modules: {type: categorical, choices: [[q_proj, v_proj], [q_proj, k_proj, v_proj, o_proj]]}

(``train: {lr: {...}}`` nested by section works too.) Everything that can be wrong with a space
is found here, before any model is loaded: unknown keys (with the nearest valid key), a type
that does not fit the key, bad bounds (low >= high, log with low <= 0, an endpoint or choice the
config itself rejects), a grid over a continuous range, and a metric the run cannot produce.
Each raises :class:`~fastft.errors.ConfigError` with one line naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fastft.config import SECTIONS, Config, _hints, _unknown, set_key, validate
from fastft.errors import ConfigError

TYPES = ("float", "int", "categorical")
_FIELDS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
           "categorical": {"type", "choices"}}
# metrics the trainer reports at every evaluation, and which way is better
LM_METRICS = {"eval_loss": "minimize", "eval_ppl": "minimize"}
CLASSIFICATION_METRICS = {"accuracy": "maximize", "precision": "maximize", "recall": "maximize",
                          "macro_f1": "maximize"}


@dataclass
class Param:
    """One searched config key. ``choices`` hold Optuna-storable values (lists become
    comma-joined strings, which the config parses back into lists)."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def distribution(self):
        import optuna.distributions as d

        if self.type == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.CategoricalDistribution(self.choices)

    def grid(self) -> list:
        """Every value a grid search visits; ConfigError for a continuous range."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "float" and self.step is None:
            raise ConfigError(f"space: {self.key} is a continuous float range; a grid needs "
                              f"'step' or type categorical")
        if self.log:
            raise ConfigError(f"space: {self.key}: a grid over a log range is not defined; "
                              "use type categorical with the values to visit")
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        vals = [self.low + i * step for i in range(n)]
        return [int(v) for v in vals] if self.type == "int" else [round(v, 12) for v in vals]

    def endpoints(self) -> list:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


@dataclass
class Space:
    params: dict[str, Param]
    metric: str
    direction: str  # "minimize" | "maximize"

    def grid(self) -> dict[str, list]:
        return {k: p.grid() for k, p in self.params.items()}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def to_dict(self) -> dict:
        return {"metric": self.metric, "direction": self.direction,
                **{k: {f: v for f, v in dataclasses.asdict(p).items()
                       if f != "key" and v not in (None, False)} for k, p in self.params.items()}}


def _number(key: str, field: str, v: Any) -> float:
    # YAML 1.1 reads 1e-5 (no dot) as a string: accept it as the number it obviously is
    if isinstance(v, bool):
        raise ConfigError(f"space: {key}.{field}={v!r}: expected a number")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"space: {key}.{field}={v!r}: expected a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"space: {key}.{field}={v!r}: expected a finite number")
    return x


def _field_type(key: str, cfg: Config) -> Any:
    section, name = key.split(".")
    typ = _hints(getattr(cfg, section))[name]
    args = typing.get_args(typ)
    if type(None) in args:  # Optional[X] -> X
        return next(a for a in args if a is not type(None))
    return typ


def _check_value(key: str, what: str, value: Any, base: Config) -> Any:
    """Set ``key`` to ``value`` on a copy of ``base`` and run the config's own validation, so a
    bound the config would reject is found now. Returns the coerced value."""
    cfg = copy.deepcopy(base)
    try:
        set_key(cfg, key, value)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"space: {key} {what}: {e}") from None
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _parse_param(key: str, spec: Any, base: Config) -> Param:
    parts = key.split(".")
    if len(parts) != 2:
        raise _space_unknown(key)
    try:
        set_key(copy.deepcopy(base), key, getattr(getattr(base, parts[0], None), parts[1], None))
    except ConfigError:
        raise _space_unknown(key) from None
    if key in ("output.dir", "train.device", "train.threads"):
        raise ConfigError(f"space: {key} cannot be searched (it says where and how to run, not what to train)")
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"space: {key}: expected a mapping with 'type' ({', '.join(TYPES)}), got {spec!r}")
    kind = spec["type"]
    if kind not in TYPES:
        raise ConfigError(f"space: {key}.type={kind!r}: expected one of {', '.join(TYPES)}")
    extra = set(spec) - _FIELDS[kind]
    if extra:
        raise ConfigError(f"space: {key}: unknown field(s) {', '.join(sorted(map(str, extra)))} for type {kind} "
                          f"(allowed: {', '.join(sorted(_FIELDS[kind]))})")
    ftype = _field_type(key, base)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"space: {key}.choices: expected a non-empty list, got {choices!r}")
        out = []
        for c in choices:
            if isinstance(c, list):  # list-valued keys (lora.target_modules): stored as "a,b"
                c = ",".join(map(str, c))
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise ConfigError(f"space: {key}.choices: {c!r} is not a number, string, bool or list")
            _check_value(key, f"choice {c!r}", c, base)
            out.append(c)
        if len(set(map(repr, out))) != len(out):
            raise ConfigError(f"space: {key}.choices has duplicates: {choices!r}")
        return Param(key, kind, choices=out)
    if ftype not in (int, float):
        raise ConfigError(f"space: {key} is a {getattr(ftype, '__name__', ftype)} key: use type categorical")
    if kind == "float" and ftype is int:
        raise ConfigError(f"space: {key} is an integer key: use type int (or categorical)")
    for f in ("low", "high"):
        if f not in spec:
            raise ConfigError(f"space: {key}: type {kind} needs '{f}'")
    low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"space: {key}.log={log!r}: expected true or false")
    step = None if spec.get("step") is None else _number(key, "step", spec["step"])
    if kind == "int":
        for f, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and not float(v).is_integer():
                raise ConfigError(f"space: {key}.{f}={v!r}: expected an integer for type int")
    if low >= high:
        raise ConfigError(f"space: {key}: low={spec['low']!r} must be below high={spec['high']!r}")
    if log and low <= 0:
        raise ConfigError(f"space: {key}: log=true needs low > 0 (got {spec['low']!r})")
    if step is not None and step <= 0:
        raise ConfigError(f"space: {key}.step={spec['step']!r}: expected a value > 0")
    if log and step is not None and (kind == "float" or step != 1):
        raise ConfigError(f"space: {key}: log=true and step cannot be combined")
    if step is not None and (high - low) / step < 1 - 1e-9:
        raise ConfigError(f"space: {key}: step={spec['step']!r} is larger than high - low")
    _check_value(key, f"low={spec['low']!r}", int(low) if kind == "int" else low, base)
    _check_value(key, f"high={spec['high']!r}", int(high) if kind == "int" else high, base)
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _space_unknown(key: str) -> ConfigError:
    return ConfigError(f"space: {_unknown(key)}")


def available_metrics(cfg: Config) -> dict[str, str]:
    """{metric: direction} of what an evaluation of this run reports (nothing without validation data)."""
    d = cfg.data
    if not d.validation_file and d.val_ratio == 0:
        return {}
    out = dict(LM_METRICS)
    per_task = dict(LM_METRICS)
    if d.format == "classification":
        out.update(CLASSIFICATION_METRICS)
        per_task = dict(CLASSIFICATION_METRICS)
    for item in d.tasks:
        name = item.split("=", 1)[0].strip()
        out.update({f"{name}/{k}": v for k, v in per_task.items()})
    return out


def _read(space: str | Path | dict) -> dict:
    if isinstance(space, dict):
        return space
    p = Path(space)
    if not p.is_file():
        raise ConfigError(f"space file {str(space)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{space}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{space}: expected a mapping of config keys to distributions, got {type(data).__name__}")
    return data


def load_space(space: str | Path | dict, base: Config, metric: str | None = None,
               direction: str | None = None, grid: bool = False) -> Space:
    """Parse and check a space (file path or dict) against the base config ``base``.

    ``metric``/``direction`` (e.g. from the command line) override the file's. ``grid`` checks
    that every parameter is discrete. Raises ConfigError (one line) on the first problem.
    """
    data = _read(space)
    flat: dict[str, Any] = {}
    for k, v in data.items():
        k = str(k)
        if k in SECTIONS and isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})  # nested form: train: {lr: {...}}
        elif k in ("metric", "direction"):
            continue
        elif "." not in k:
            raise ConfigError(f"space: unknown key {k!r}: expected a dotted config key (train.lr) "
                              "or metric/direction")
        else:
            flat[k] = v
    if not flat:
        raise ConfigError("space: no parameter to search (give dotted config keys with distributions)")
    params = {k: _parse_param(k, v, base) for k, v in flat.items()}
    metric = metric or data.get("metric") or base.train.early_stopping_metric
    avail = available_metrics(base)
    if metric not in avail:
        have = ", ".join(avail) or "nothing (no validation data: set data.val_ratio or data.validation_file)"
        raise ConfigError(f"space: metric={metric!r}: this run's evaluation reports {have}")
    direction = direction or data.get("direction") or avail[metric]
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"space: direction={direction!r}: expected minimize or maximize")
    out = Space(params, metric, direction)
    if grid:
        out.grid()
    return out


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """A copy of ``base`` with the sampled ``params`` set and validated (ConfigError for a
    combination the config rejects, e.g. warm-up longer than the run)."""
    cfg = copy.deepcopy(base)
    for k, v in params.items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg
