"""Llama family (llama, mistral, qwen2, qwen3): everything fastft has fused.

* Head: plain ``lm_head`` (tied or not), no logit transform.
* Blocks: fused RMSNorm, SwiGLU, RoPE, plain causal attention and whole frozen layers
  (:func:`fastft.models.hf_fast.patch_blocks`, which knows these modules' class names).
* Attention: fastft's causal kernel for mask-free self-attention and for packed rows given as
  segments (``fastft.models.loss.attention_inputs``, ``hf_fast.routes_attention``).
"""
from __future__ import annotations

from fastft.models import hf_fast
from fastft.models.base import Adapter

ADAPTER = Adapter(name="llama", model_types=tuple(hf_fast.SUPPORTED_MODEL_TYPES), fused_ce=True,
                  fused_blocks=True, fused_attention=True,
                  _patch=hf_fast.patch_blocks)
