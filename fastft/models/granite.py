"""Granite (dense): logits are ``lm_head(h) / config.logits_scaling``.

The division is a scale of ``1 / logits_scaling`` in the fused CE. Granite's other muP
multipliers (embedding, residual, attention) live inside the decoder, which the fused loss runs
as is. GraniteMoE adds a router auxiliary loss to HF's loss and is left to the generic adapter.
"""
from __future__ import annotations

from fastft.models.base import Adapter, HeadTransform


def _scale(config) -> HeadTransform:
    s = getattr(config, "logits_scaling", None)
    return HeadTransform(scale=1.0 if s is None else 1.0 / float(s))


ADAPTER = Adapter(name="granite", model_types=("granite",), fused_ce=True,
                  head_keys=("logits_scaling",), _transform=_scale)
