"""What an architecture adapter is: the per-family facts fastft needs to train a causal LM.

An :class:`Adapter` answers, for one family of Hugging Face ``*ForCausalLM`` models:

* ``fused_ce``: may the loss run the decoder (``model.base_model``) and then
  :func:`fastft.ops.fused_linear_cross_entropy` on the last hidden states and the output head's
  weight, instead of HF's forward (which builds the (B, T, V) logits)? Only when the family's
  ``forward`` does nothing between the decoder and the loss except ``lm_head`` and the logit
  transform the adapter reproduces (:meth:`Adapter.head_transform`).
* ``head_keys``: the config keys whose logit transform the adapter applies (soft-cap, scale).
  A config carrying any other known head-transform key (:data:`HEAD_TRANSFORM_KEYS`) is not
  trusted: the registry falls back to the generic adapter rather than guess.
* ``fused_blocks`` / ``fused_attention``: whether :meth:`Adapter.patch_blocks` rewires the
  decoder blocks (norms, MLP, rotary, attention, whole layers) onto fused kernels.
* ``drop_causal_mask``: whether a right-padded 0/1 mask may be dropped so plain causal attention
  runs (fastft's causal kernels need that; exact, see ``fastft.models.loss.causal_suffices``).

The generic adapter (:func:`generic_adapter`) claims nothing: HF's own forward computes the
logits (every transform included) and fastft only sums the cross-entropy. Correct for any causal
LM, unfused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Adapter", "HeadTransform", "HEAD_TRANSFORM_KEYS", "active_head_keys", "generic_adapter"]

# Config keys that (in some transformers model) change the logits after ``lm_head``. The value
# that means "no transform" is given so a config that merely carries the key at its identity value
# (e.g. ``logit_scale=1.0``) is not refused. Keys of models fastft has no adapter for are listed
# too: a family adapter whose config carries one of them (a fine-tune that added a multiplier)
# falls back to HF's forward.
HEAD_TRANSFORM_KEYS: dict[str, object] = {
    "final_logit_softcapping": None,   # Gemma 2/3: z = c * tanh(x / c)
    "logit_scale": 1.0,                # Cohere, Cohere 2: z = x * s
    "logits_scaling": 1.0,             # Granite, GraniteMoE: z = x / s
    "output_logits_scaling": 1.0,
    "lm_head_multiplier": 1.0,         # Falcon-H1
    "logits_soft_cap": None,
    "mup_width_multiplier": 1.0,
    "dim_model_base": None,            # MiniCPM: x / (hidden / dim_model_base)
}


def _is_identity(key: str, value) -> bool:
    ident = HEAD_TRANSFORM_KEYS[key]
    if value is None or value is False:
        return True
    if ident is None:
        return False
    try:
        return float(value) == float(ident)
    except (TypeError, ValueError):
        return False


def active_head_keys(config) -> dict[str, object]:
    """The head-transform keys of ``config`` set to something other than their identity value."""
    return {k: getattr(config, k) for k in HEAD_TRANSFORM_KEYS
            if hasattr(config, k) and not _is_identity(k, getattr(config, k))}


@dataclass(frozen=True)
class HeadTransform:
    """``logits -> softcap * tanh(scale * logits / softcap)`` (no cap when ``softcap`` is None).

    ``scale`` multiplies the raw ``lm_head`` output (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``); the soft-cap (Gemma 2/3's ``final_logit_softcapping``) comes after.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"HeadTransform.scale={self.scale}: expected a positive finite number")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"HeadTransform.softcap={self.softcap}: expected a positive number or None")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) raw head output -> the logits the model's softmax sees (same shape)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def describe(self) -> str:
        parts = ([f"x{self.scale:g}"] if self.scale != 1.0 else []) + \
                ([f"softcap {self.softcap:g}"] if self.softcap is not None else [])
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Adapter:
    """How fastft trains one architecture family (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    fused_ce: bool = True
    head_keys: tuple[str, ...] = ()
    fused_blocks: bool = False
    fused_attention: bool = False
    drop_causal_mask: bool = False
    reason: str = ""  # the generic adapter: why no family adapter applies
    _transform: object = field(default=None, repr=False, compare=False)  # (config) -> HeadTransform
    _patch: object = field(default=None, repr=False, compare=False)      # (model, attention, layers) -> counts

    @property
    def generic(self) -> bool:
        return self.name == "generic"

    def notice(self) -> str:
        """One line for the user: which fused paths are off and why (generic adapter only)."""
        mt = self.model_types[0] if self.model_types else None
        return (f"fastft: model_type={mt!r} trains through Hugging Face's own forward and loss "
                f"(fused cross-entropy, fused blocks and fused attention off): {self.reason}")

    def head_transform(self, config) -> HeadTransform:
        """The logit transform HF's ``forward`` applies after ``lm_head`` for this ``config``."""
        return self._transform(config) if self._transform is not None else HeadTransform()

    def patch_blocks(self, model: nn.Module, attention: bool = True, layers: bool = True) -> dict[str, int]:
        """Rewire the decoder blocks onto fused kernels in place; the counts per kind patched
        (empty when the family has no fused blocks)."""
        if not self.fused_blocks or self._patch is None:
            return {}
        return self._patch(model, attention=attention and self.fused_attention, layers=layers)

    def fused_paths(self) -> list[str]:
        """Names of the fused paths this adapter uses (for notices and ``fastft env``)."""
        out = (["fused cross-entropy"] if self.fused_ce else []) + \
              (["fused blocks"] if self.fused_blocks else []) + \
              (["fused attention"] if self.fused_attention else [])
        return out


def generic_adapter(model_type: str | None, reason: str) -> Adapter:
    """Any causal LM: HF's forward (every logit transform it has) and fastft's cross-entropy sum.
    ``reason`` says why no family adapter applies (shown once by :meth:`Adapter.notice`)."""
    return Adapter(name="generic", model_types=(model_type,) if model_type else (), fused_ce=False,
                   reason=reason)
