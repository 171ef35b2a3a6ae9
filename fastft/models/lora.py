"""LoRA and int8 model surgery on top of :mod:`fastft.ops.lora_linear`, with PEFT-format adapters.

* :class:`Int8Linear` — a frozen ``nn.Linear`` stored as int8 + per-channel scales (+ 16-bit outlier
  columns); :func:`quantize_model_int8` swaps them in (norms, embeddings, ``lm_head`` and the
  classification heads stay float).
* :class:`LoRALinear` — wraps an ``nn.Linear`` or ``Int8Linear`` as ``base_layer`` with
  ``lora_A`` (r, in) / ``lora_B`` (out, r) ``nn.Linear`` children, i.e. the parameter names of a
  PEFT LoRA layer without the adapter-name level; :func:`inject_lora` puts them in place.
* :func:`save_adapter` / :func:`load_adapter` — ``adapter_config.json`` + ``adapter_model.safetensors``
  with PEFT's keys (``base_model.model.<path>.lora_A.weight``; trained heads as
  ``modules_to_save``), so ``peft.PeftModel.from_pretrained(base, dir)`` loads what fastft trained
  and fastft loads what PEFT trained. PEFT itself is not needed at run time.
* :func:`merge_lora` — fold ``W + s·B A`` into plain ``nn.Linear`` layers for ``save_pretrained``.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from fastft.errors import ConfigError, UserError
from fastft.ops.lora_linear import Int8Weight, int8_linear, lora_linear, quantize_int8

__all__ = ["Int8Linear", "LoRALinear", "inject_lora", "quantize_model_int8", "save_adapter", "load_adapter",
           "merge_lora", "remove_lora", "set_module", "trainable_parameters_line"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
HEAD_NAMES = ("lm_head", "score", "classifier")


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """A frozen linear layer with an int8 weight: ``y = x deq(W)ᵀ + bias``.

    Buffers: ``qweight`` (out, in) int8, ``scale`` (out,) fp32, ``outlier_idx`` (k,) int64,
    ``outlier_w`` (out, k) 16-bit (k = 0 without outliers). ``bias``: (out,) frozen parameter or
    None. ``dtype`` is the float dtype the layer computes in (its original weight's dtype).
    """

    def __init__(self, w: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        out_f, in_f = w.shape
        self.in_features, self.out_features, self.dtype = in_f, out_f, dtype
        self.register_buffer("qweight", w.qweight)
        self.register_buffer("scale", w.scale)
        idx = w.outlier_idx if w.outlier_idx is not None else torch.zeros(0, dtype=torch.int64, device=w.device)
        ow = w.outlier_w if w.outlier_w is not None else torch.zeros(out_f, 0, dtype=torch.float16, device=w.device)
        self.register_buffer("outlier_idx", idx)
        self.register_buffer("outlier_w", ow)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, outlier_threshold: float | None = None) -> "Int8Linear":
        if linear.weight.dim() != 2:
            raise ValueError(f"Int8Linear: weight must be 2-D, got {tuple(linear.weight.shape)}")
        q = quantize_int8(linear.weight.detach(), outlier_threshold)
        return cls(q, linear.bias, linear.weight.dtype).train(linear.training)

    def weight_int8(self) -> Int8Weight:
        k = self.outlier_idx.numel()
        return Int8Weight(self.qweight, self.scale, self.outlier_idx if k else None, self.outlier_w if k else None)

    def dequantized(self) -> nn.Linear:
        """A float ``nn.Linear`` (in ``self.dtype``) with the dequantised weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.qweight.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_int8().dequantize(torch.float32))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x):
        return int8_linear(x, self.weight_int8(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"outliers={self.outlier_idx.numel()}, dtype={self.dtype}")


class LoRALinear(nn.Module):
    """``y = base(x) + scaling · lora_B(lora_A(dropout(x)))`` through the fused op.

    Args:
        base: ``nn.Linear`` or :class:`Int8Linear` (frozen here).
        r: rank >= 1. alpha: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: on the LoRA branch's input, training mode only.
    The adapters are in the base's dtype (bf16 runs: bf16 params, fp32 masters in the optimizer);
    ``lora_A`` is Kaiming-uniform and ``lora_B`` zero, as in PEFT, so the layer starts as ``base``.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Linear, Int8Linear)):
            raise TypeError(f"LoRALinear: base must be nn.Linear or Int8Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError(f"lora.r={r!r}: expected an integer >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lora.dropout={dropout}: expected 0 <= dropout < 1")
        if isinstance(base, nn.Linear) and base.weight.dim() != 2:
            raise ValueError(f"LoRALinear: base weight must be 2-D, got {tuple(base.weight.shape)}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dtype = base.dtype if isinstance(base, Int8Linear) else base.weight.dtype
        device = base.qweight.device if isinstance(base, Int8Linear) else base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.train(base.training)  # a layer injected into an eval-mode model must not drop out

    def _base_weight(self):
        b = self.base_layer
        return b.weight_int8() if isinstance(b, Int8Linear) else b.weight

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)
        return lora_linear(x, self._base_weight(), self.lora_A.weight, self.lora_B.weight, self.scaling,
                           dropout=self.dropout if self.training else 0.0, bias=self.base_layer.bias)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A: (out, in) fp32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def merge(self) -> None:
        """Fold ``scaling · B A`` into the base weight. An int8 base is dequantised first (warns)."""
        if self.merged:
            return
        if isinstance(self.base_layer, Int8Linear):
            mb = self.base_layer.qweight.numel() * torch.finfo(self.base_layer.dtype).bits / 8 / 2 ** 20
            warnings.warn(f"LoRALinear.merge: the int8 base ({self.out_features}x{self.in_features}) is "
                          f"dequantised to {self.base_layer.dtype} ({mb:.1f} MiB) to hold the merged weight; "
                          "unmerge() keeps it in floating point", UserWarning, stacklevel=2)
            self.base_layer = self.base_layer.dequantized().requires_grad_(False)
        w = self.base_layer.weight
        with torch.no_grad():
            w.copy_(w.float() + self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        with torch.no_grad():
            w.copy_(w.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Model surgery
# ----------------------------------------------------------------------------------------------
def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name`` (dotted path) of ``model``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


_set_module = set_module


def remove_lora(model: nn.Module) -> int:
    """Undo :func:`inject_lora`: every :class:`LoRALinear` gives its ``base_layer`` back (merged
    adapters are unmerged first). Returns the number of layers restored."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            if m.merged:
                m.unmerge()
            set_module(model, name, m.base_layer)
            n += 1
    model.__dict__.pop("_fastft_lora", None)
    return n


def _excluded_heads(model: nn.Module) -> set[str]:
    """Names of the output embedding and classification heads (never adapted/quantised by default)."""
    out = set()
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if name.rpartition(".")[2] in HEAD_NAMES or (emb is not None and mod is emb):
            out.add(name)
    return out


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))]


def _match(name: str, targets) -> str | None:
    """The target that selects module ``name`` (PEFT's rules: regex -> fullmatch, list -> the name
    or a ``.``-suffix of it), or None."""
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, name) else None
    for t in targets:
        if name == t or name.endswith("." + t):
            return t
    return None


def quantize_model_int8(model: nn.Module, skip=("lm_head",), outlier_threshold: float | None = None,
                        verbose: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` by an :class:`Int8Linear`, in place, except ``skip`` (module
    names or ``.``-suffixes), the output embedding and classification heads (``score``,
    ``classifier``). Norms and embeddings are not linear layers and stay float. Returns ``model``."""
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    heads = _excluded_heads(model)
    before = after = 0
    for name in [n for n, m in model.named_modules() if type(m) is nn.Linear]:
        if name in heads or _match(name, skip):
            continue
        lin = model.get_submodule(name)
        q = Int8Linear.from_linear(lin, outlier_threshold)
        before += lin.weight.numel() * lin.weight.element_size()
        after += q.weight_int8().nbytes()
        _set_module(model, name, q)
    if verbose and before:
        print(f"int8 base: {before / 2 ** 20:.1f} MiB of linear weights -> {after / 2 ** 20:.1f} MiB "
              f"({after / before:.2f}x)")
    return model


def trainable_parameters_line(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line; int8 weights count as parameters of the total."""
    trainable = total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.qweight.numel() for m in model.modules() if isinstance(m, Int8Linear))
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def inject_lora(model: nn.Module, target_modules="all-linear", r: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, use_rslora: bool = False, verbose: bool = True) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in :class:`LoRALinear`, in place.

    Args:
        target_modules: list of module names / ``.``-suffixes (``["q_proj", "v_proj"]``), a regex
            matched against full module names (``re.fullmatch``), or ``"all-linear"`` (every linear
            layer except the output embedding and classification heads) — PEFT's semantics.
        r, alpha, dropout, use_rslora: see :class:`LoRALinear`.
    Returns:
        ``model`` with every parameter frozen except the adapters.
    Raises:
        ConfigError: r <= 0, or a target that matches no linear layer (lists real ones).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"lora.r={r!r}: expected an integer >= 1")
    linear = _linear_names(model)
    heads = _excluded_heads(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        chosen = [n for n in linear if n not in heads]
    else:
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
            if not target_modules:
                raise ConfigError("lora.target_modules=[]: expected at least one module name")
        chosen = [n for n in linear if _match(n, target_modules)]
        leaves = sorted({n.rpartition(".")[2] for n in linear})
        hint = f"linear layers here: {', '.join(leaves[:10])}"
        if not chosen:
            raise ConfigError(f"lora.target_modules={target_modules!r}: no module matched; {hint}")
        if not isinstance(target_modules, str):
            unmatched = [t for t in target_modules if not any(_match(n, [t]) for n in linear)]
            if unmatched:
                raise ConfigError(f"lora.target_modules={target_modules!r}: {unmatched!r} matched no linear "
                                  f"layer; {hint}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora))
    model._fastft_lora = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
                          "target_modules": target_modules}
    if verbose:
        print(trainable_parameters_line(model))
    return model


# ----------------------------------------------------------------------------------------------
# PEFT-format adapters
# ----------------------------------------------------------------------------------------------
def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _task_type(model: nn.Module) -> str:
    return "SEQ_CLS" if "ForSequenceClassification" in type(model).__name__ else "CAUSAL_LM"


def save_adapter(model: nn.Module, out_dir: str, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format.

    Every LoRA layer's A/B, plus every trainable parameter outside the adapters (a new
    ``score``/``classifier`` head) as PEFT ``modules_to_save`` (key ``base_model.model.<param>``).
    ``weights``: the trainable parameters' full values by ``named_parameters`` name, written
    instead of the model's own (FSDP2 holds only shards: fastft.dist_checkpoint gathers them).
    """
    from safetensors.torch import save_file

    mods = _lora_modules(model)
    if not mods:
        raise UserError("save_adapter: the model has no LoRA layers (call inject_lora first)")
    params = dict(model.named_parameters())
    value = (lambda n: params[n].detach()) if weights is None else (lambda n: weights[n])  # noqa: E731
    state, to_save = {}, set()
    for name in mods:
        state[f"{PREFIX}{name}.lora_A.weight"] = value(f"{name}.lora_A.weight").contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = value(f"{name}.lora_B.weight").contiguous()
    for name, p in params.items():
        if p.requires_grad and ".lora_A." not in name and ".lora_B." not in name:
            state[PREFIX + name] = value(name).contiguous()
            to_save.add(name.rpartition(".")[0].rpartition(".")[2])
    first = next(iter(mods.values()))
    info = getattr(model, "_fastft_lora", {})
    targets = info.get("target_modules", sorted({n.rpartition(".")[2] for n in mods}))
    if isinstance(targets, str) and targets == "all-linear":  # PEFT resolves it to names on load
        targets = sorted({n.rpartition(".")[2] for n in mods})
    cfg = {
        "peft_type": "LORA", "task_type": _task_type(model), "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": first.dropout, "use_rslora": first.use_rslora, "target_modules": targets,
        "modules_to_save": sorted(to_save) or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, str(Path(out_dir) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (Path(out_dir) / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def load_adapter(model: nn.Module, in_dir: str) -> nn.Module:
    """Load a PEFT-format adapter (saved by fastft or PEFT) into ``model`` in place.

    A model without LoRA layers gets them injected from the adapter's config first. Raises
    UserError for a missing/unsupported adapter or tensors whose shapes do not fit this model.
    """
    from safetensors.torch import load_file

    cfg_path, w_path = Path(in_dir) / ADAPTER_CONFIG, Path(in_dir) / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"adapter {in_dir!r}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} there")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") \
            or cfg.get("alpha_pattern") or cfg.get("fan_in_fan_out"):
        raise UserError(f"adapter {in_dir!r}: only plain LoRA adapters are supported (peft_type LORA, "
                        "no DoRA, rank/alpha patterns or fan_in_fan_out)")
    mods = _lora_modules(model)
    if not mods:
        inject_lora(model, cfg["target_modules"], int(cfg["r"]), float(cfg["lora_alpha"]),
                    float(cfg.get("lora_dropout", 0.0)), bool(cfg.get("use_rslora", False)), verbose=False)
        mods = _lora_modules(model)
    r, alpha, rs = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    scaling = alpha / math.sqrt(r) if rs else alpha / r
    for m in mods.values():  # the adapter defines the scale
        m.alpha, m.use_rslora, m.scaling = alpha, rs, scaling
    params = dict(model.named_parameters())
    state = load_file(str(w_path))
    seen = set()
    for key, t in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        name = name.replace(".modules_to_save.default.", ".")
        p = params.get(name)
        if p is None:
            raise UserError(f"adapter {in_dir!r}: tensor {key!r} has no counterpart in this model "
                            f"(LoRA layers here: {', '.join(list(mods)[:3])}, ...)")
        if p.shape != t.shape:
            raise UserError(f"adapter {in_dir!r}: tensor {key!r} has shape {tuple(t.shape)}, this model "
                            f"expects {tuple(p.shape)} (adapter trained on a different base model?)")
        with torch.no_grad():
            _copy_into(p, t)
        seen.add(name)
    missing = [f"{n}.{ab}.weight" for n in mods for ab in ("lora_A", "lora_B") if f"{n}.{ab}.weight" not in seen]
    if missing:
        raise UserError(f"adapter {in_dir!r}: no weights for {len(missing)} LoRA tensors of this model, "
                        f"e.g. {missing[0]!r} (different target_modules?)")
    return model


def _copy_into(p: torch.Tensor, t: torch.Tensor) -> None:
    """``p.copy_(t)``; an FSDP2-sharded ``p`` (DTensor) takes this rank's part of the full ``t``
    (every rank read the whole file, so no communication)."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # torch without distributed
        DTensor = ()
    if isinstance(p, DTensor):
        t = distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(t)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base and replace LoRA and int8 layers by plain ``nn.Linear``
    (int8 bases are dequantised, with a warning), so ``save_pretrained`` writes an HF model."""
    mods = _lora_modules(model)
    n_int8 = sum(isinstance(m.base_layer, Int8Linear) and not m.merged for m in mods.values())
    for name, m in list(mods.items()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one summary warning below
            m.merge()
        _set_module(model, name, m.base_layer)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Int8Linear)]:
        _set_module(model, name, m.dequantized())
        n_int8 += 1
    if n_int8:
        warnings.warn(f"merge_lora: {n_int8} int8 layers were dequantised to floating point", UserWarning,
                      stacklevel=2)
    if hasattr(model, "_fastft_lora"):
        del model._fastft_lora
    return model
