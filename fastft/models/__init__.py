"""Model adapters: one place that answers "how is this model trained".

``adapter_for(model)`` returns the :class:`~fastft.models.base.Adapter` of the model's family
(``fastft/models/<family>.py``), or the generic adapter — HF's own forward and fastft's
cross-entropy sum, correct for any causal LM, unfused — with one notice saying which fused paths
are off and why. The trainer's loss (:class:`fastft.models.loss.CausalLMLoss`), ``patch_model``,
``patch_blocks``, ``fastft eval`` and the bench all ask it.

A family adapter is refused (generic instead) when the model's config carries a known logit
transform the adapter does not apply (:data:`fastft.models.base.HEAD_TRANSFORM_KEYS`), when the
output head is not a plain ``nn.Linear`` (e.g. adapted by LoRA), or when HF's loss adds a router
auxiliary loss (``config.output_router_logits``).

| family | model types | fused CE (head transform) | fused blocks / attention |
|---|---|---|---|
| llama | llama, mistral, qwen2, qwen3 | yes | yes / yes |
| gemma | gemma; gemma2, gemma3_text | yes (gemma2/3: soft-cap) | no |
| cohere | cohere, cohere2 | yes (x logit_scale) | no |
| granite | granite | yes (/ logits_scaling) | no |
| plain-head | phi, phi3, olmo, olmo2, gpt_neox, gpt2, opt, falcon, stablelm, starcoder2 | yes | no |
| generic | everything else | no: HF's forward | no |

The rest of the folder is the model side of fastft that the adapters drive: ``loss.py`` (the
causal-LM loss with the head transform), ``hf_fast.py`` and ``fused_layer.py`` (fused blocks and
decoder layers on :mod:`fastft.ops`), ``hf_patch.py`` (the fused-loss patch), ``recompute.py``,
``lora.py`` (LoRA/int8 surgery, PEFT-format adapters), ``loading.py`` and ``int8_loading.py``
(model sources), ``classifier.py`` (sequence classification), ``merge.py`` and ``generate.py``.
"""
from __future__ import annotations

import warnings

from torch import nn

from fastft.models import cohere, gemma, granite, llama, plain
from fastft.models.base import (HEAD_TRANSFORM_KEYS, Adapter, HeadTransform, active_head_keys,
                                generic_adapter)

__all__ = ["Adapter", "HeadTransform", "HEAD_TRANSFORM_KEYS", "FAMILIES", "adapter_for", "blocks_adapter_for",
           "unwrap"]

FAMILIES: tuple[Adapter, ...] = (llama.ADAPTER, *gemma.ADAPTERS, cohere.ADAPTER, granite.ADAPTER,
                                 plain.ADAPTER)
_BY_TYPE = {mt: a for a in FAMILIES for mt in a.model_types}
_noticed: set[str] = set()


def unwrap(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _refusal(lm: nn.Module, fam: Adapter | None) -> str | None:
    """Why ``fam`` must not train ``lm`` (None: it may)."""
    if fam is None:
        return "fastft has no adapter for this architecture"
    cfg = lm.config
    extra = {k: v for k, v in active_head_keys(cfg).items() if k not in fam.head_keys}
    if extra:
        k, v = next(iter(extra.items()))
        return f"its config sets {k}={v!r}, a logit transform the {fam.name} adapter does not apply"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"its output head is {type(head).__name__}, not a plain nn.Linear"
    if not hasattr(lm, "base_model") or lm.base_model is lm:
        return f"{type(lm).__name__} has no separate decoder (base_model)"
    if getattr(cfg, "output_router_logits", False):
        return "HF's loss adds a router auxiliary loss (config.output_router_logits)"
    return None


def adapter_for(model: nn.Module, notify: bool = True) -> Adapter:
    """The adapter that trains ``model`` (a HF causal LM, possibly PEFT-wrapped).

    With ``notify``, a generic fallback is announced once per distinct reason (a
    ``RuntimeWarning`` naming the fused paths that are off and why).
    """
    lm = unwrap(model)
    mt = getattr(getattr(lm, "config", None), "model_type", None)
    fam = _BY_TYPE.get(mt)
    why = _refusal(lm, fam)
    if why is None:
        return fam
    a = generic_adapter(mt, why)
    msg = a.notice()
    if notify and msg not in _noticed:
        _noticed.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return a


def blocks_adapter_for(model: nn.Module) -> Adapter | None:
    """The family adapter whose :meth:`~Adapter.patch_blocks` may rewire ``model``'s decoder
    blocks, or None. Blocks depend only on the family (``config.model_type``), not on the head:
    a ``*ForSequenceClassification`` model or a head with a logit transform the family does not
    apply still runs the family's fused blocks (its loss is decided by :func:`adapter_for`)."""
    lm = unwrap(model)
    return _BY_TYPE.get(getattr(getattr(lm, "config", None), "model_type", None))
