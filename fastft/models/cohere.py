"""Cohere family (cohere, cohere2): logits are ``lm_head(h) * config.logit_scale``.

The scale goes into the fused CE (``logit_scale``), so loss and gradients see the scaled logits
HF's forward computes. Blocks: HF's (LayerNorm without bias, parallel attention/MLP residual).
"""
from __future__ import annotations

from fastft.models.base import Adapter, HeadTransform


def _scale(config) -> HeadTransform:
    s = getattr(config, "logit_scale", None)
    return HeadTransform(scale=1.0 if s is None else float(s))


ADAPTER = Adapter(name="cohere", model_types=("cohere", "cohere2"), fused_ce=True,
                  head_keys=("logit_scale",), _transform=_scale)
