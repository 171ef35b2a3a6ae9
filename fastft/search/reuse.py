"""Load once, train many: the model and tokenised data of a search, built per trial without
reloading from disk, on the stages of :class:`fastft.train.Recipe`.

``TrialBuilder.build(cfg)`` returns what ``fastft.train.cli.build(cfg)`` returns — (model,
tokenizer, bundle, device) — through the same recipe stages ``fastft train`` runs (load, data,
adapt), so a trial trains exactly what a fresh ``fastft train`` process with that config
would (tests/test_search.py checks this against a real ``fastft train`` subprocess). What it
keeps between trials:

* **the loaded model and tokeniser** (one :class:`Recipe` per model section and data format:
  a trial that changes ``model.*`` loads again, and the search says so once).
* **tokenised data**: the recipe keeps its bundle while the data section and seed stay; a
  trial that changes max_length/packing/format re-tokenises through the on-disk data cache.
* **LoRA trials**: ``Recipe.adapt`` takes the previous adapters out (each ``LoRALinear`` gives
  back its ``base_layer``) and injects fresh ones from the trial's seed. Frozen weights are
  never copied; only the adapters (and their fp32 masters, built by the optimizer) are new.
* **full / partial / head trials**: the recipe is made with ``keep_base=True`` and restores the
  weights the previous trial trained from its one in-memory copy (peak memory: the model plus a
  copy of what trains, plus the trial's training state). When free memory (MemAvailable) is under
  three times the weights, each such trial loads the model again instead, and the search says so.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from fastft.config import Config
from fastft.train import Recipe

# keys whose change needs another load of the model (the recipe adapts one loaded model)
_STRUCTURE_KEYS = ("model.", "data.format")


def changes_structure(keys) -> bool:
    """Does searching these config keys need more than one model load?"""
    return any(k.startswith(_STRUCTURE_KEYS) for k in keys)


def _load_key(cfg: Config) -> str:
    return repr((cfg.model, cfg.data.format))


class TrialBuilder:
    """Builds each trial's (model, tokenizer, bundle, device) from what is already in memory."""

    def __init__(self, log: Callable[[str], None] = print, lora_only: bool = False):
        # lora_only: every trial is LoRA on the same base; no copy of base weights is ever needed
        self.log, self.lora_only = log, lora_only
        self.recipe: Recipe | None = None
        self.reloads = 0  # model loads from disk (1 for a search that reuses everything)
        self._base_trained = False  # a trial without keep_base trained the base weights
        self._said: set[str] = set()

    def _say_once(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            self.log(msg)

    def _load(self, cfg: Config) -> Recipe:
        self.recipe = None  # free the previous model before loading the next
        keep = not self.lora_only or _trains_base(cfg)
        recipe = Recipe(cfg, log=self.log, keep_base=False)
        recipe.load()
        if keep and _room_for_copy(recipe.model):
            recipe.keep_base = True
        elif keep:
            free, need = _available_bytes(), _model_bytes(recipe.model)
            self._say_once(f"search: {free / 2**30:.1f} GiB free, a copy of the base weights needs "
                           f"{need / 2**30:.1f} GiB: trials reload the model instead of copying it")
        recipe.data()
        self.reloads += 1
        self.recipe, self._base_trained = recipe, False
        return recipe

    def preload(self, cfg: Config) -> None:
        """Load the model, tokeniser and data of ``cfg`` now (bad data or model paths fail here,
        before a search writes anything)."""
        self._load(cfg)

    def build(self, cfg: Config):
        """(model, tokenizer, bundle, device) for ``cfg``, as ``fastft.train.cli.build(cfg)`` gives."""
        r = self.recipe
        if r is None or _load_key(cfg) != _load_key(r.cfg):
            if r is not None:
                self._say_once("search: a trial changes the model section or data format: the model is "
                               "loaded again for it")
            r = self._load(cfg)
        elif self._base_trained:  # no copy of the trained weights to restore them from
            r = self._load(cfg)
        model = r.adapt(cfg)
        self._base_trained = not r.keep_base and _trains_base(cfg)
        return model, r.tokenizer, r.data(), r.device


def _trains_base(cfg: Config) -> bool:
    """Does a trial of ``cfg`` change weights the loaded model came with (not only new adapters)?
    A new classification head counts: it was initialised at load time."""
    return cfg.finetune.mode != "lora" or cfg.data.format == "classification"


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _room_for_copy(model: nn.Module) -> bool:
    """Is there room for a copy of the base weights plus a trial's training state (optimizer
    moments and masters, activations: taken as twice the weights again)? Unknown counts as yes."""
    free = _available_bytes()
    return free is None or free > 3 * _model_bytes(model)
