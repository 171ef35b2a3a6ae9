"""Causal LMs whose head is a plain ``lm_head`` matmul (optionally with bias or tied to the input
embedding) and whose decoder is all HF's: only the fused cross-entropy applies.

Each listed ``model_type`` was checked (tests/test_model_adapters.py, the architecture matrix):
its ``*ForCausalLM.forward`` computes ``logits = lm_head(last_hidden_state)`` and HF's causal-LM
loss on them, nothing else, so ``fused_linear_cross_entropy(last_hidden_state, lm_head.weight,
lm_head.bias)`` gives the same loss and gradients. MoE families are not here: HF adds a router
auxiliary loss to theirs.
"""
from __future__ import annotations

from fastft.models.base import Adapter

MODEL_TYPES = ("phi", "phi3", "olmo", "olmo2", "gpt_neox", "gpt2", "opt", "falcon", "stablelm",
               "starcoder2")

ADAPTER = Adapter(name="plain-head", model_types=MODEL_TYPES, fused_ce=True)
