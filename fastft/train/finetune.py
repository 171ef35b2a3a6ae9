"""Fine-tuning modes: which parameters train, their lr/weight-decay groups, and the param table.

Modes (``finetune.mode``):

* ``full``    every parameter trains.
* ``partial`` embeddings (``freeze_embeddings``) and the bottom ``freeze_layers`` layers frozen;
  ``trainable_regex`` keeps only matching parameters trainable.
* ``head``    only the output head (``lm_head``/``score``/``classifier``), a linear probe.
* ``lora``    adapters on ``lora.target_modules``; the base (optionally int8) is frozen.

In every mode ``frozen_regex`` freezes matching parameters. ``unfreeze_after_steps`` > 0 gives
progressive unfreezing ("partial, then whole retraining"): after that many steps the whole
model trains (not in lora mode, whose base is frozen by design).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from fastft.models.lora import Int8Linear

HEAD_RE = re.compile(r"(^|\.)(lm_head|score|classifier)\.")
LAYER_RE = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.block\.(\d+)\.")
NO_DECAY_RE = re.compile(r"(bias$|norm|\.ln_|layernorm|embed|wte|wpe)", re.IGNORECASE)


def layer_index(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return None if m is None else int(next(g for g in m.groups() if g is not None))


def num_layers(model: nn.Module) -> int:
    idx = [layer_index(n) for n, _ in model.named_parameters()]
    return max([i for i in idx if i is not None], default=-1) + 1


def is_new_param(name: str) -> bool:
    """Adapters and task heads are new (full lr); everything else is pretrained backbone."""
    return "lora_" in name or bool(re.search(r"(^|\.)(score|classifier)\.", name))


def apply_freezing(model: nn.Module, ft_cfg, unfrozen: bool = False) -> None:
    """Set ``requires_grad`` per the mode. In lora mode call this after the adapters exist.

    ``unfrozen`` (progressive unfreezing reached) makes everything except ``frozen_regex`` train.
    """
    mode = ft_cfg.mode
    embed_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    frozen_re = re.compile(ft_cfg.frozen_regex) if ft_cfg.frozen_regex else None
    train_re = re.compile(ft_cfg.trainable_regex) if ft_cfg.trainable_regex else None
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue  # int8 weights and the like never train
        if mode == "lora" and not unfrozen:
            train = "lora_" in name or is_new_param(name)
        elif unfrozen or mode == "full":
            train = True
        elif mode == "head":
            train = bool(HEAD_RE.search(name))
            if not train and id(p) in embed_ids and model.get_output_embeddings() is not None:
                # tied embeddings: the head IS the embedding matrix
                train = model.get_output_embeddings().weight is p
        else:  # partial
            train = True
            if ft_cfg.freeze_embeddings and id(p) in embed_ids:
                train = False
            li = layer_index(name)
            if li is not None and li < ft_cfg.freeze_layers:
                train = False
            if train_re is not None and not train_re.search(name):
                train = False
        if frozen_re is not None and frozen_re.search(name):
            train = False
        if ".original_module." in name:  # PEFT keeps an unused copy of heads it trains
            train = False
        p.requires_grad_(train)
    if mode == "lora" and not unfrozen:
        # LoRA convention: the embeddings stay frozen (lora modules on embeddings would be new params)
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)


def param_groups(model: nn.Module, ft_cfg, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups of the trainable parameters: (lr scale, decay) buckets.

    No weight decay on biases, norms, embeddings (and any 1-D tensor). Pretrained weights get
    ``lr * backbone_lr_scale * layer_lr_decay**(L-1-i)`` (i = layer index, non-layer backbone
    weights below the layers count as layer 0, above as layer L-1); adapters and heads get ``lr``.
    """
    L = max(1, num_layers(model))
    buckets: dict[tuple[float, float], list] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        scale = 1.0
        if not is_new_param(name):
            li = layer_index(name)
            if li is None:
                li = 0 if "embed" in name or "wte" in name else L - 1
            scale = ft_cfg.backbone_lr_scale * ft_cfg.layer_lr_decay ** (L - 1 - li)
        wd = 0.0 if (p.ndim < 2 or NO_DECAY_RE.search(name)) else weight_decay
        buckets.setdefault((scale, wd), []).append((name, p))
    groups = []
    for (scale, wd), items in sorted(buckets.items(), key=lambda kv: -kv[0][0]):
        groups.append({"params": [p for _, p in items], "names": [n for n, _ in items],
                       "lr": lr * scale, "lr_scale": scale, "weight_decay": wd})
    return groups


def _group_of(name: str) -> str:
    if "lora_" in name:
        return "lora adapters"
    if HEAD_RE.search(name):
        return "head"
    if "embed" in name or "wte" in name:
        return "embeddings"
    li = layer_index(name)
    if li is not None:
        return f"layer {li}"
    return "other (norms, ...)"


def param_table(model: nn.Module) -> str:
    """A text table of trainable vs total parameters per group (count and %), tied weights once;
    int8 base weights count as frozen parameters (as in ``trainable_parameters_line``)."""
    rows: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        r = rows.setdefault(_group_of(name), [0, 0])
        r[1] += p.numel()
        if p.requires_grad:
            r[0] += p.numel()
    for name, m in model.named_modules():  # int8 base weights are buffers, but frozen parameters of the model
        if isinstance(m, Int8Linear):
            rows.setdefault(_group_of(f"{name}.weight"), [0, 0])[1] += m.qweight.numel()

    def key(g: str):
        return (0, int(g.split()[1])) if g.startswith("layer ") else (-1 if g == "embeddings" else 1, g)

    lines = [f"{'group':<20}{'trainable':>14}{'total':>14}{'%':>8}"]
    tt = tot = 0
    ordered = sorted(rows, key=key)
    i = 0
    while i < len(ordered):  # collapse runs of identical layers: "layers 0-29"
        g, j = ordered[i], i
        while (g.startswith("layer ") and j + 1 < len(ordered) and ordered[j + 1].startswith("layer ")
               and rows[ordered[j + 1]] == rows[g]):
            j += 1
        t, n = rows[g]
        label = g if j == i else f"layers {g.split()[1]}-{ordered[j].split()[1]}"
        count = j - i + 1
        tt, tot = tt + t * count, tot + n * count
        lines.append(f"{label:<20}{t * count:>14,}{n * count:>14,}{100 * t / max(n, 1):>7.2f}%")
        i = j + 1
    lines.append(f"{'total':<20}{tt:>14,}{tot:>14,}{100 * tt / max(tot, 1):>7.2f}%")
    return "\n".join(lines)


def setup_lora(model: nn.Module, lora_cfg, gradient_checkpointing: bool) -> nn.Module:
    """Inject adapters (fastft.models.lora) and optionally quantise the frozen base to int8.

    Returns the model to train (the same object: adapters are injected in place).
    """
    from fastft.models.lora import inject_lora, quantize_model_int8

    if lora_cfg.int8_base:
        quantize_model_int8(model, skip=["lm_head"])
    out = inject_lora(model, target_modules=list(lora_cfg.target_modules), r=lora_cfg.r,
                      alpha=lora_cfg.alpha, dropout=lora_cfg.dropout, use_rslora=lora_cfg.use_rslora)
    model = out if isinstance(out, nn.Module) else model
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        # frozen embeddings give an input without grad: checkpointed blocks would get no gradient
        model.enable_input_require_grads()
    return model



def save_adapter(model: nn.Module, out_dir: str, weights: dict | None = None) -> None:
    """Write the LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors);
    ``weights``: gathered full values of the trainable parameters (FSDP2), by parameter name."""
    from fastft.models.lora import save_adapter as _save

    _save(model, out_dir, weights)


def load_adapter(model: nn.Module, in_dir: str) -> None:
    """Load adapter weights saved by ``save_adapter`` into an already-injected model."""
    from fastft.models.lora import load_adapter as _load

    _load(model, in_dir)
