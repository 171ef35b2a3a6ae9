"""Gemma family: gemma, gemma2, gemma3 text (``Gemma3ForCausalLM``).

* Head: tied ``lm_head``; Gemma 2 and 3 soft-cap the logits, ``z = c * tanh(x / c)`` with
  ``c = config.final_logit_softcapping`` (loss and gradient through the tanh, in the fused CE).
  Gemma 1's forward applies no cap, so a Gemma 1 config carrying the key is not trusted (the
  registry then falls back to HF's forward).
* Embedding scaling (``* sqrt(hidden)``) happens inside the decoder (``model.base_model``), which
  the fused loss runs as is.
* Blocks: HF's. Gemma's RMSNorm scales by ``1 + weight`` and its MLP is GeGLU (tanh GELU), neither
  of which the fused kernels compute; Gemma 2/3 attention soft-caps its scores and mixes sliding
  windows, so HF's attention paths (and the mask) are kept.
"""
from __future__ import annotations

from fastft.models.base import Adapter, HeadTransform


def _softcap(config) -> HeadTransform:
    return HeadTransform(softcap=getattr(config, "final_logit_softcapping", None))


GEMMA = Adapter(name="gemma", model_types=("gemma",), fused_ce=True)
GEMMA2 = Adapter(name="gemma2", model_types=("gemma2", "gemma3_text"), fused_ce=True,
                 head_keys=("final_logit_softcapping",), _transform=_softcap)
ADAPTERS = (GEMMA, GEMMA2)
