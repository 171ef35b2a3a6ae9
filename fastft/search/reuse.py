"""Load once, train many: the model and tokenised data of a search, built per trial without
reloading from disk.

``TrialBuilder.build(cfg)`` returns what ``fastft.train_cli.build(cfg)`` returns — (model,
tokenizer, bundle, device) — and runs the same stages in the same order with the same seeding,
so a trial trains exactly what a fresh ``fastft train`` process with that config would
(tests/test_search_reuse.py checks this against a real ``fastft train`` subprocess). What it
keeps between trials:

* **the tokeniser and the loaded base model** (one per load key: path, GGUF file, dtype,
  attention implementation, model.dropout). Loading consumes no global RNG (checked), so
  ``seed_everything(seed)`` followed by the kept model leaves the RNG where a fresh load does.
* **tokenised data** per data settings and seed (the split depends on train.seed); a trial
  that changes max_length/packing/format re-tokenises through the on-disk data cache.
* **LoRA trials** reuse the patched model of the previous LoRA trial: its adapters are taken
  out (each ``LoRALinear`` gives back its ``base_layer``) and fresh ones are injected from the
  trial's seed. Frozen weights are never copied; only the adapters (and their fp32 masters,
  built by the optimizer) are new.
* **full / partial / head trials** (and LoRA trials that change the base: int8, fused blocks,
  gradient checkpointing) start from ``copy.deepcopy`` of the kept base model — one in-memory
  copy of the weights instead of a reload, i.e. peak memory is two models' weights plus the
  trial's training state. When free memory (MemAvailable) is under three times the weights,
  trials reload the model from disk instead, and the search says so once. Their fp32 master sources (bf16 runs) are read from the fp32 safetensors
  as ``fastft train`` does (memory-mapped, in the page cache after the first trial).
* **classification** reloads per trial: ``from_pretrained`` initialises the new head from the
  global RNG in its own order, which a copy cannot replay exactly (the encoders we use load in
  about a second).

This mirrors ``train_cli.build`` stage by stage; it is written to move onto the recipe object
of the architecture issue (explicit stages) once that lands.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
from typing import Callable

import torch
from torch import nn

from fastft.config import Config
from fastft.errors import ConfigError

# keys whose change needs a new copy of the base model (the model's structure or dtypes change)
_STRUCTURE_KEYS = ("model.", "finetune.mode", "finetune.freeze_embeddings", "finetune.freeze_layers",
                   "finetune.trainable_regex", "finetune.frozen_regex", "finetune.unfreeze_after_steps",
                   "lora.int8_base")


def changes_structure(keys) -> bool:
    """Does searching these config keys change the model's structure (not only what trains)?"""
    return any(k.startswith(_STRUCTURE_KEYS) for k in keys)


class TrialBuilder:
    """Builds each trial's (model, tokenizer, bundle, device) from what is already in memory."""

    def __init__(self, log: Callable[[str], None] = print, lora_only: bool = False):
        # lora_only: every trial is LoRA on the same base, so the kept base itself carries the
        # adapters (no copy at all); the search sets it when no space key changes the structure
        self.log, self.lora_only = log, lora_only
        self._base: dict = {}  # load key -> (model, tokenizer): at most one kept
        self._data: dict = {}  # data key -> DataBundle: at most a few kept
        self._lora_model: nn.Module | None = None  # the patched model of the last LoRA trial
        self._lora_key = None
        self.reloads = 0  # base-model loads from disk (1 for a search that reuses everything)
        self._said: set[str] = set()

    # ------------------------------------------------------------------ pieces kept in memory
    @staticmethod
    def _load_key(cfg: Config, dtype) -> tuple:
        m = cfg.model
        return (m.path, m.gguf_file, str(dtype), m.attn_implementation, m.dropout)

    def _say_once(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            self.log(msg)

    def _base_model(self, cfg: Config, dtype):
        from fastft.model_loading import load_model_and_tokenizer

        key = self._load_key(cfg, dtype)
        if key not in self._base:
            if self._base:
                self._say_once("search: a trial changes how the model loads (model.dtype/dropout/path...): "
                               "the base model is reloaded when that key changes")
            self._base.clear()
            self._drop_lora_model()
            gc.collect()
            model, tok, _ = load_model_and_tokenizer(cfg.model.path, cfg.model.gguf_file, dtype=dtype,
                                                     attn_implementation=cfg.model.attn_implementation,
                                                     dropout=cfg.model.dropout)
            self.reloads += 1
            self._base[key] = (model, tok)
        return self._base[key]

    def _bundle(self, cfg: Config, tok):
        from fastft.data import build_datasets

        key = (repr(cfg.data), cfg.train.seed, id(tok))
        if key not in self._data:
            if len(self._data) >= 4:  # a space over data keys: keep the latest few
                self._data.pop(next(iter(self._data)))
            self._data[key] = build_datasets(cfg.data, tok, seed=cfg.train.seed)
        return self._data[key]

    def _drop_lora_model(self) -> None:
        self._lora_model, self._lora_key = None, None

    def preload(self, cfg: Config) -> None:
        """Load the base model, tokeniser and data of ``cfg`` now (bad paths fail here, before a
        search writes anything)."""
        from fastft.train_utils import resolve_device, resolve_dtype

        from transformers.utils import logging as hf_logging

        from fastft.data import preflight

        preflight(cfg.data)  # unreadable data fails before the slow model load, as in fastft train
        hf_logging.disable_progress_bar()  # as fastft train: no "Loading weights" bars per load
        if cfg.data.format == "classification":
            return
        device = resolve_device(cfg.train.device)
        dtype = resolve_dtype(cfg.model.dtype, device)
        _, tok = self._base_model(cfg, dtype)
        self._bundle(cfg, tok)

    # ------------------------------------------------------------------ one trial
    def build(self, cfg: Config):
        """(model, tokenizer, bundle, device) for ``cfg``, as ``train_cli.build(cfg)`` gives."""
        from fastft import distributed as dist
        from fastft.train_cli import build as fresh_build
        from fastft.train_cli import seed_everything
        from fastft.train_utils import resolve_device, resolve_dtype

        if cfg.data.format == "classification":
            self._say_once("search: classification trials load the model per trial (the new head's "
                           "initialisation must match a fresh run's)")
            return fresh_build(cfg)
        device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        dist.init(device)
        dtype = resolve_dtype(cfg.model.dtype, device)
        if dtype == torch.float16 and device.type != "cuda":
            raise ConfigError("model.dtype=fp16: fp16 with loss scaling needs a GPU; use bf16 or fp32 on CPU")
        base, tok = self._base_model(cfg, dtype)
        seed_everything(cfg.train.seed)  # loading used no RNG: the state a fresh run has here
        bundle = self._bundle(cfg, tok)
        structure = (self._load_key(cfg, dtype), repr(cfg.model), cfg.lora.int8_base)
        if cfg.finetune.mode == "lora" and self._lora_model is not None and self._lora_key == structure:
            model = self._lora_model
            _remove_lora(model)
        else:
            self._drop_lora_model()
            gc.collect()
            in_place = self.lora_only and cfg.finetune.mode == "lora"
            if not in_place and not _room_for_copy(base):
                free, need = _available_bytes(), _model_bytes(base)
                self._say_once(f"search: {free / 2**30:.1f} GiB free, a copy of the base weights needs "
                               f"{need / 2**30:.1f} GiB: trials reload the model instead of copying it")
                in_place = True
                self._base.clear()  # this trial uses the kept model up; the next one loads again
            model = self._prepare_base(base if in_place else copy.deepcopy(base), cfg)
        if cfg.finetune.mode == "lora":
            from fastft.finetune import setup_lora

            with contextlib.redirect_stdout(io.StringIO()):  # inject_lora's parameter line, once per trial
                model = setup_lora(model, cfg.lora, cfg.model.gradient_checkpointing)
            self._lora_model, self._lora_key = model, structure
        return self._finish(model, cfg, dtype), tok, bundle, device

    @staticmethod
    def _prepare_base(model: nn.Module, cfg: Config) -> nn.Module:
        """Stages of ``train_cli.build`` between loading and the fine-tuning mode."""
        from fastft.train_cli import _patch_blocks
        from fastft.train_utils import unwrap

        if cfg.model.fused_blocks:
            _patch_blocks(model, cfg.model.fused_attention, cfg.model.fused_layers)
        if cfg.model.gradient_checkpointing:
            lm = unwrap(model)
            if hasattr(lm, "activation_checkpointing_enable"):
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    @staticmethod
    def _finish(model: nn.Module, cfg: Config, dtype) -> nn.Module:
        """Stages of ``train_cli.build`` after the fine-tuning mode: freezing and precision."""
        from fastft.finetune import apply_freezing
        from fastft.precision import keep_fp32_weights
        from fastft.train_utils import resolve_device

        apply_freezing(model, cfg.finetune)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"finetune: mode={cfg.finetune.mode!r} with these regex/freeze settings leaves "
                              "no parameter to train")
        keep_fp32_weights(model, cfg.finetune)
        if dtype != torch.float32 and cfg.finetune.mode != "lora":
            from fastft.model_loading import materialize
            from fastft.precision import attach_fp32_sources

            attach_fp32_sources(model, materialize(cfg.model.path, cfg.model.gguf_file, None))
        return model.to(resolve_device(cfg.train.device))


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


def _remove_lora(model: nn.Module) -> int:
    """Put every ``LoRALinear``'s ``base_layer`` back in its place (the frozen weight object
    itself, not a copy). Returns how many were removed."""
    from fastft.lora import LoRALinear

    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base_layer)
    if hasattr(model, "_fastft_lora"):
        del model._fastft_lora
    return len(names)
