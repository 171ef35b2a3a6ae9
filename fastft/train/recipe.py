"""One training recipe, in explicit stages: load -> data -> adapt -> train -> evaluate -> export.

:class:`Recipe` owns what ``fastft train`` does, one method per stage, each with its inputs and
outputs, so callers can reuse and interleave the stages:

Load once, train many (hyperparameter search, sweeps)::

    from fastft.config import load_config
    from fastft.train import Recipe

    recipe = Recipe(load_config("base.yaml", []))
    recipe.load()                       # model + tokenizer, once (the slow part)
    recipe.data()                       # tokenised DataBundle, once
    for i, r in enumerate((8, 16)):
        cfg = load_config("base.yaml", ["--lora.r", str(r), "--output.dir", f"runs/r{r}"])
        recipe.adapt(cfg)               # undoes the previous trial (adapters, int8, trained
                                        # weights), then LoRA/freezing from cfg.train.seed
        summary = recipe.train(f"runs/r{r}")   # optimizer + schedule + loop + final eval/save
        # summary["eval_after"]["eval_loss"] is the trial's objective

A trial run this way equals a fresh process's ``fastft train`` with the same config and seed
(tests/test_recipe.py): ``adapt`` and ``train`` re-seed from ``cfg.train.seed``. Full/partial
trials change the base weights; ``Recipe(cfg, keep_base=True)`` keeps a copy of the weights
they train so the next ``adapt`` restores them (without it a second ``adapt`` after such a run
is refused rather than silently training a trained model).

Stepping in between stages (distributed training, custom loops): every stage is public and
leaves its result on the recipe — ``recipe.model``, ``recipe.tokenizer``, ``recipe.bundle``,
``recipe.device`` — so a wrapper can, e.g., shard ``recipe.model`` after :meth:`Recipe.adapt`
and before :meth:`Recipe.make_trainer` (which builds the optimizer and lr schedule over the
parameters it then sees), or drive ``trainer.train_step()`` itself. :meth:`Recipe.setup` (device,
threads, ``torch.distributed`` init, dtype) runs first and is idempotent.

Stages and what they leave:

=================  ==========================================  =====================================
stage              inputs                                      result
=================  ==========================================  =====================================
``setup()``        cfg.train.device/threads, cfg.model.dtype   ``device``, ``dtype``
``load()``         cfg.model                                   ``model``, ``tokenizer`` (and, for
                                                               classification, ``bundle``: the label
                                                               set sizes the head)
``data(bundle)``   cfg.data (or a ready ``DataBundle``)        ``bundle``
``adapt(cfg)``     cfg.model (patches), cfg.finetune, cfg.lora ``model`` ready to train, on ``device``
``make_trainer``   run_dir, cfg.train                          a :class:`fastft.train.trainer.Trainer`:
                                                               optimizer + schedule + loop
``train(run_dir)`` the above                                   the trainer's summary
``evaluate()``     examples (default: validation split)        ``{"eval_loss", "eval_ppl", ...}``
``export(dir)``    the trained model                           PEFT adapter or HF model folder
=================  ==========================================  =====================================
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastft.errors import ConfigError, UserError
from fastft.models.lora import Int8Linear, remove_lora, set_module
from fastft.train import distributed as dist
from fastft.train.precision import remove_fp32_hooks

__all__ = ["Recipe", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Recipe:
    """The stages of a fastft training run on one config (see the module docstring).

    Args:
        cfg: a resolved ``fastft.config.Config``.
        log: where progress lines go (``print``; the CLI passes ``click.echo``).
        keep_base: keep a copy of the weights a full/partial/head run trains, so a later
            :meth:`adapt` can restore them (costs their size in memory).
    """

    def __init__(self, cfg, log: Callable[[str], None] = print, keep_base: bool = False):
        self.cfg, self.log, self.keep_base = cfg, log, keep_base
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.bundle = None
        self.trainer = None
        self._new_params: list[str] = []   # a new classification head: trains in every mode
        self._adapted = False
        self._base_dirty = False           # base weights were (or may have been) trained
        self._saved: dict[str, torch.Tensor] = {}
        self._data_key = None              # (cfg.data, seed) the bundle was built from; None: given
        self._int8_originals: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ setup / load
    def setup(self) -> torch.device:
        """Device, threads, ``torch.distributed`` (under torchrun) and run dtype. Idempotent."""
        if self.device is not None:
            return self.device
        from transformers.utils import logging as hf_logging

        from fastft.train.utils import resolve_device, resolve_dtype

        cfg = self.cfg
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
        self.device, self.dtype = device, dtype
        return device

    def load(self, check_data: bool = True):
        """Load the model and tokenizer of ``cfg.model`` (once). Returns (model, tokenizer).

        ``check_data``: read and check ``cfg.data``'s files first (``fastft.data.preflight``), so
        bad data fails in seconds, before the slow model load (off when the caller brings its own
        ``DataBundle``). Classification reads the data first anyway: its label set sizes the head.
        """
        from fastft.data import build_datasets, preflight
        from fastft.models.loading import load_model_and_tokenizer

        cfg = self.cfg
        if check_data:
            preflight(cfg.data)
        self.setup()
        seed_everything(cfg.train.seed)
        if cfg.data.format == "classification":
            from fastft.models.classifier import load_classifier
            from fastft.models.loading import load_tokenizer, materialize, resolve_package_path

            tok = load_tokenizer(materialize(resolve_package_path(cfg.model.path), cfg.model.gguf_file))
            self.bundle = build_datasets(cfg.data, tok, seed=cfg.train.seed)
            self._data_key = _data_key(cfg)
            seed_everything(cfg.train.seed)
            model, tok, self._new_params = load_classifier(
                cfg.model.path, self.bundle.label_names, dtype=self.dtype, gguf_file=cfg.model.gguf_file,
                attn_implementation=cfg.model.attn_implementation)
        else:
            # int8 base weights stream straight into int8 (fastft/models/int8_loading.py): the float
            # model is never held whole, so an int8 recipe keeps them across trials (_model_key)
            model, tok, _ = load_model_and_tokenizer(cfg.model.path, cfg.model.gguf_file, dtype=self.dtype,
                                                     attn_implementation=cfg.model.attn_implementation,
                                                     dropout=cfg.model.dropout, int8_base=_int8_base(cfg))
        self.model, self.tokenizer = model, tok
        self._adapted = self._base_dirty = False
        return model, tok

    def data(self, bundle=None):
        """The tokenised data (``cfg.data``), or ``bundle`` (a ready ``DataBundle``, e.g.
        ``fastft bench``'s fixed-length rows) in its place. Built once; returns it."""
        from fastft.data import build_datasets

        if bundle is not None:
            self.bundle, self._data_key = bundle, None
        elif self.bundle is None:
            if self.tokenizer is None:
                raise UserError("Recipe.data(): call load() first (the tokenizer comes with the model)")
            self.bundle = build_datasets(self.cfg.data, self.tokenizer, seed=self.cfg.train.seed)
            self._data_key = _data_key(self.cfg)
        return self.bundle

    # ------------------------------------------------------------------ adapt
    def adapt(self, cfg=None) -> nn.Module:
        """Make the loaded model trainable as ``cfg`` (default: the recipe's) says: fused blocks
        (the model's adapter, fastft/models/), gradient checkpointing, LoRA/int8 (adapters
        initialised from ``cfg.train.seed``), freezing, the fp32 weight policy; on ``device``.

        A second call first undoes the previous one (:meth:`reset`). ``cfg`` may change the
        ``finetune``, ``lora``, ``train``, ``data``-independent keys; a different ``model`` section
        needs a new :meth:`load`. Returns the model.
        """
        from fastft.train.finetune import apply_freezing, setup_lora
        from fastft.train.precision import keep_fp32_weights

        if self.model is None:
            raise UserError("Recipe.adapt(): call load() first")
        if cfg is not None:
            if _model_key(cfg) != _model_key(self.cfg):
                raise ConfigError("Recipe.adapt(cfg): cfg.model (or lora.int8_base) differs from the loaded "
                                  "model's; build a new Recipe (or call load()) for another model")
            self.cfg = cfg
            if self._data_key is not None and self._data_key != _data_key(cfg):
                self.bundle = None  # its split/shuffle came from another data section or seed: rebuilt
        if self._adapted:
            self.reset()
        cfg = self.cfg
        model = self.model
        if cfg.model.fused_blocks:
            _patch_blocks(model, cfg.model.fused_attention, cfg.model.fused_layers, self.log)
        if cfg.model.gradient_checkpointing:
            lm = _unwrap(model)  # transformers 5 renamed it; keep working on 4.x
            if hasattr(lm, "activation_checkpointing_enable"):
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        seed_everything(cfg.train.seed)  # adapters start from the seed, whatever ran before
        if cfg.finetune.mode == "lora":
            if cfg.lora.int8_base:
                self._int8_originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
            model = setup_lora(model, cfg.lora, cfg.model.gradient_checkpointing)
        apply_freezing(model, cfg.finetune)
        if self._new_params:
            from fastft.models.classifier import mark_trainable

            mark_trainable(model, self._new_params)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"finetune: mode={cfg.finetune.mode!r} with these regex/freeze settings leaves "
                              "no parameter to train")
        self._snapshot(model)
        keep_fp32_weights(model, cfg.finetune)  # trainable embeddings/norms in fp32 (fastft/train/precision.py)
        if self.dtype != torch.float32 and cfg.finetune.mode != "lora" and cfg.data.format != "classification":
            from fastft.models.loading import materialize
            from fastft.train.precision import attach_fp32_sources

            # fp32 masters/embeddings from the fp32 source, as HF's fp32 weights (fastft/train/precision.py)
            attach_fp32_sources(model, materialize(cfg.model.path, cfg.model.gguf_file, None))
        self.model = model.to(self.device)
        if dist.world_size() > 1:  # weights and LoRA init are identical on every rank; dropout is not
            dist.seed_ranks(cfg.train.seed)
        self._adapted = True
        return self.model

    def _snapshot(self, model: nn.Module) -> None:
        """Before a run that may train base weights: keep them (keep_base) or remember that it did."""
        ft = self.cfg.finetune
        base_trains = any(p.requires_grad and "lora_" not in n for n, p in model.named_parameters()) or (
            ft.mode != "lora" and ft.unfreeze_after_steps > 0)
        if not base_trains:
            return
        self._base_dirty = True
        if self.keep_base and not self._saved:
            self._saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}

    def reset(self) -> nn.Module:
        """Undo :meth:`adapt`: remove LoRA adapters, restore int8-quantised layers to their float
        originals, restore trained base weights (``keep_base``) and freeze nothing. Fused-block
        patches stay (they do not depend on the weights). Returns the model."""
        model = self.model
        if self._base_dirty and not self._saved:
            raise UserError("Recipe.adapt(): the previous run trained the base weights; create the "
                            "Recipe with keep_base=True (or call load() again) to train another trial")
        remove_lora(model)
        remove_fp32_hooks(model)
        for name, m in list(model.named_modules()):
            if isinstance(m, Int8Linear):
                if _int8_base(self.cfg) and name not in self._int8_originals:
                    continue  # loaded as int8 (load()); the next trial is int8 too (_model_key)
                if name not in self._int8_originals:
                    raise UserError(f"Recipe.reset(): {name} was quantised outside the recipe; load() again")
                set_module(model, name, self._int8_originals[name])
        self._int8_originals = {}
        if self._saved:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in self._saved.items():
                    p = params[n]
                    p.data = t.clone().to(p.device)  # original dtype too (keep_fp32_weights upcasts)
                    for attr in ("_fastft_master_init",):
                        p.__dict__.pop(attr, None)
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
            p.grad = None
        self._base_dirty = False
        self._adapted = False
        self.trainer = None
        return model

    # ------------------------------------------------------------------ train / eval / export
    def make_trainer(self, run_dir, metrics_hook=None):
        """The optimizer, lr schedule and loop over the adapted model (``fastft.train.trainer.Trainer``).
        ``metrics_hook`` defaults to the data's (classification metrics, per-task losses)."""
        from fastft.train.trainer import Trainer

        if not self._adapted:
            raise UserError("Recipe.make_trainer(): call adapt() first")
        bundle = self.data()
        if metrics_hook is None:
            from fastft.train.evaluation import make_metrics_hook

            metrics_hook = make_metrics_hook(bundle, run_dir, self.tokenizer.pad_token_id or 0,
                                             self.cfg.train.batch_size)
        self.trainer = Trainer(self.cfg, Path(run_dir), self.model, self.tokenizer, bundle, self.device,
                               metrics_hook=metrics_hook, log=self.log)
        return self.trainer

    def train(self, run_dir, resume_from: Path | None = None, metrics_hook=None) -> dict:
        """Train to the end of the schedule in ``run_dir`` (created); returns the trainer's summary.

        The global RNGs are re-seeded from ``cfg.train.seed`` first (dropout masks do not depend
        on what ran before), then ``resume_from`` (a checkpoint directory) restores its own."""
        trainer = self.trainer if self.trainer is not None and Path(self.trainer.run_dir) == Path(run_dir) \
            else self.make_trainer(run_dir, metrics_hook)
        if dist.is_main():
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        seed_everything(self.cfg.train.seed)
        if resume_from is not None:
            trainer.resume_from(resume_from)
        summary = trainer.train()
        summary["run_dir"] = str(run_dir)
        return summary

    def evaluate(self, examples: list[dict] | None = None) -> dict:
        """Token-weighted loss and perplexity (plus the data's metrics) of the current model on
        ``examples`` (default: the validation split)."""
        if self.trainer is None:
            raise UserError("Recipe.evaluate(): call make_trainer() or train() first")
        return self.trainer.evaluate(examples)

    def export(self, out_dir) -> Path:
        """Write the trained model: the PEFT-format adapter (lora) or a HF model folder, with the
        tokenizer. Returns ``out_dir``. An FSDP2-sharded model makes it collective: every rank
        calls it and rank 0 writes the gathered weights (the adapters only, for LoRA)."""
        from fastft.train import checkpoint as ck
        from fastft.train import dist_checkpoint as dcp_ck

        out, is_lora, full = Path(out_dir), self.cfg.finetune.mode == "lora", None
        if dcp_ck.is_sharded(self.model):
            full = dcp_ck.full_state_dict(self.model, trainable_only=is_lora)
            if not dist.is_main():
                return out
        out.mkdir(parents=True, exist_ok=True)
        ck.save_model_files(self.model, self.tokenizer, out, is_lora, state_dict=full)
        return out


def _model_key(cfg) -> tuple:
    m = cfg.model
    return (m.path, m.gguf_file, m.dtype, m.attn_implementation, m.dropout, cfg.data.format, _int8_base(cfg))


def _int8_base(cfg) -> bool:
    """The frozen base linears are int8 (LoRA only; loaded that way)."""
    return bool(cfg.lora.int8_base and cfg.finetune.mode == "lora" and cfg.data.format != "classification")


def _data_key(cfg) -> str:
    return repr((cfg.data, cfg.train.seed))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _patch_blocks(model, attention: bool, layers: bool, log) -> None:
    """Fused blocks as the model's family adapter says (fastft/models/); others run HF's, said once."""
    from fastft.models import blocks_adapter_for

    adapter = blocks_adapter_for(model)
    if adapter is not None and adapter.fused_blocks:
        adapter.patch_blocks(model, attention=attention, layers=layers)
        return
    mt = getattr(getattr(_unwrap(model), "config", None), "model_type", None)
    who = f"the {adapter.name} adapter has none" if adapter is not None else "fastft has no adapter for it"
    log(f"model.fused_blocks: no fused blocks for model_type {mt!r} ({who}); running HF's blocks")
